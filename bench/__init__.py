"""Benchmark, data-preparation, training and packaging scripts; each runs as ``python -m bench.NAME`` from the
repository root, on the one runner of ``bench/harness.py``. Results and how to rerun them: BENCHMARKS.md."""
