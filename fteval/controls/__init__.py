"""Known-answer validation (``python -m fteval bench controls``): an aligned base, planted erosion and null
controls, evaluated with ``fteval test`` on held-out prompts (:mod:`fteval.controls.command`)."""

from fteval.controls.command import bench_controls

__all__ = ["bench_controls"]
