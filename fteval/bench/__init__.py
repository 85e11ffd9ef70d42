"""Benchmarks (``python -m fteval bench train|eval|generation|stats|grit-ablation``): training throughput
against a plain loop (train), evaluation statistics and hidden-state extraction speed (eval), generation
backends side by side (generation), calibration of the statistics (stats), GRIT's ablation. Methods and
tables: BENCHMARKS.md."""

from fteval.bench.eval import bench_eval
from fteval.bench.generation import bench_generation
from fteval.bench.stats import bench_stats
from fteval.bench.train import bench_train

__all__ = ["bench_eval", "bench_generation", "bench_stats", "bench_train"]
