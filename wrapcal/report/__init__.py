"""Evaluation reports."""
