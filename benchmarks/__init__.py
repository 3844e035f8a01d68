"""Benchmarks: each prints a table; `--report FILE` also appends it as an entry (docs/BENCHMARKS.md keeps the
ones worth keeping). A plain run never edits the checkout."""
