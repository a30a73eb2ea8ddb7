"""Benchmarks: each script writes JSON figures to bench/results/ (TARGETS.md)."""
