"""Benchmarks: each `python -m bench.<name>` times a fast path against the straightforward way."""
