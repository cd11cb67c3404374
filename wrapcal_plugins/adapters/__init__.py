"""Adapters that split model families the core does not know (Hugging Face transformers)."""
