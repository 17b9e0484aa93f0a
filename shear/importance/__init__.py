"""Importance criteria: which blocks (depth) and which units (width) matter least."""
