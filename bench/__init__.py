"""Benchmarks and experiment scripts: `python -m bench.<script>` from the repository root; each prints a table and
writes JSON under bench/results/."""
