"""Panther's benchmark harness: timing, roofline, cases, report and plots (entry point: benchmarks/run.py)."""
