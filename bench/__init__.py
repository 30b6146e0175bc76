"""Benchmarks. `python -m bench` runs them and prints a Markdown table for docs/."""
