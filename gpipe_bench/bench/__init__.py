"""Benchmarks of the gpipe-bench engine and harness (``python -m gpipe_bench.bench.engine``)."""
