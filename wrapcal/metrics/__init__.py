"""Calibration and OOD metrics."""
