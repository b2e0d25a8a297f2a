"""Throughput and memory benchmarks: ``python -m benchmarks.run --help`` (results and method in BENCHMARKS.md)."""
