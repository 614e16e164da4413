"""Imported by entry_points.py through its directory on sys.path."""

HIDDEN = 5
