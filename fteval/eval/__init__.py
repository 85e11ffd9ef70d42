"""Evaluation: AQI torchmetrics, pooling, statistics, the AQIEvaluator test loop, behaviour."""

from fteval.eval.module import AQIEvaluator

__all__ = ["AQIEvaluator"]
