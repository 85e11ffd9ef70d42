"""Benchmarks (``python -m fteval bench train|eval|stats``): training throughput against a plain loop,
evaluation statistics and hidden-state extraction speed, calibration of the statistics (stats). Methods and tables: BENCHMARKS.md."""

from fteval.bench.eval import bench_eval
from fteval.bench.stats import bench_stats
from fteval.bench.train import bench_train

__all__ = ["bench_eval", "bench_stats", "bench_train"]
