"""Benchmarks (``python -m fteval bench train|eval``): training throughput against a plain loop,
evaluation statistics and hidden-state extraction speed. Methods and tables: BENCHMARKS.md."""

from fteval.bench.eval import bench_eval
from fteval.bench.train import bench_train

__all__ = ["bench_eval", "bench_train"]
