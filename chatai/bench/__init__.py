"""Benchmarks that print figures: the side-by-side comparison and the relay ceiling."""
