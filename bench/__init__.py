"""Benchmarks: run as modules, e.g. `python -m bench.teacher_throughput`; not part of the tests."""
