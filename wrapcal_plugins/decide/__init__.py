"""Decisions from the calibrated output: conformal prediction sets and abstention."""
