"""Taps, the batch runner and the summary shared by both calibration modes."""
