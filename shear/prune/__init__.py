"""Structured pruning: depth (whole blocks), width (heads, neurons, channels), sheared (L0 masks)."""
