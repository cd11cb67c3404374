"""Samplers: plugins that draw several predictions per input at inference (MC dropout)."""
