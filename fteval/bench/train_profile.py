"""Where a training step's time goes: ``fteval bench train --profile``.

:func:`profile_method` runs one method under ``torch.profiler``; :func:`top_ops` ranks the kernels
by self CUDA time (on a GPU, plus the host side of the same steps) or the ops by self CPU time, and
sums them by category (a name heuristic).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fteval.bench.common import BenchModel
from fteval.bench.train_runs import RunSpec, run_method

__all__ = ["profile_method", "top_ops"]

_CATEGORIES = (  # substring of a kernel/op name (lower case) -> category; first match wins (heuristic)
    ("4-bit dequantise", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_fused")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "mm", "matmul", "linear")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross-entropy/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("copy/cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (elementwise, norms, ...)"


def top_ops(prof, active_steps: int, device: torch.device, top: int = 20) -> dict:
    """Top ``top`` kernels/ops by self CUDA time or self CPU time, and time per category."""
    on_device = device.type == "cuda"

    def self_us(ev) -> float:
        if on_device:
            v = getattr(ev, "self_device_time_total", None)
            return float(v if v is not None else getattr(ev, "self_cuda_time_total", 0.0))
        return float(ev.self_cpu_time_total)

    events = [ev for ev in prof.key_averages() if self_us(ev) > 0]
    if on_device:  # kernels only: their self CUDA time is the GPU's busy time
        # (not user annotations such as Lightning's "Optimizer.step#AdamW.step" range, which the profiler
        # also places on the GPU timeline, spanning the whole step)
        kernels = [ev for ev in events if getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type)
                   and not getattr(ev, "is_user_annotation", False)]
        events = kernels or events
    total = sum(self_us(ev) for ev in events) or 1.0
    events.sort(key=self_us, reverse=True)
    rows = [{
        "name": ev.key[:120],
        "calls": int(ev.count),
        "self_ms_per_step": self_us(ev) / 1000.0 / active_steps,
        "percent": 100.0 * self_us(ev) / total,
        "category": _category(ev.key),
    } for ev in events[:top]]
    cats: dict[str, float] = {}
    for ev in events:
        cats[_category(ev.key)] = cats.get(_category(ev.key), 0.0) + self_us(ev)
    out = {
        "sort_by": "self device (CUDA kernel) time" if on_device else "self CPU time",
        "total_ms_per_step": total / 1000.0 / active_steps,
        "top": rows,
        "categories_ms_per_step": {k: v / 1000.0 / active_steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
    }
    if on_device:
        # Host side of the same steps: at launch-bound shapes the step is the host's time, not the GPU's.
        host = [ev for ev in prof.key_averages()
                if ev.self_cpu_time_total > 0 and "CUDA" not in str(getattr(ev, "device_type", ""))]
        host.sort(key=lambda ev: ev.self_cpu_time_total, reverse=True)
        out["kernels_per_step"] = sum(int(ev.count) for ev in events) / active_steps
        out["host_top"] = [{
            "name": ev.key[:120],
            "calls": int(ev.count),
            "self_cpu_ms_per_step": ev.self_cpu_time_total / 1000.0 / active_steps,
        } for ev in host[:top]]
    return out


def profile_method(spec: RunSpec, bm: BenchModel, workdir: Path) -> dict:
    """Run ``spec`` under ``torch.profiler`` (its ``steps`` recorded after its warm-up); the top kernels or ops."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bm.device.type == "cuda" else [])
    sched = schedule(wait=max(spec.warmup - 1, 0), warmup=1, active=spec.steps, repeat=1)
    with profile(activities=activities, schedule=sched) as prof:
        row = run_method(spec, bm, workdir, profiler=prof)
    if row["error"]:
        return {"method": spec.method, "error": row["error"]}
    active = spec.steps
    out = {"method": spec.method, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
           "gradient_checkpointing": spec.gradient_checkpointing, "steps_profiled": active,
           "step_p50_ms_under_profiler": row["step_p50_ms"]}
    out.update(top_ops(prof, active, bm.device))
    return out
