"""PNG charts of training runs for ``fteval compare`` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from fteval.analysis.runs import RunSummary, smooth
from fteval.io import write_atomic
from fteval.methods import display_name, order_key

__all__ = ["matplotlib_available", "loss_curves_png", "efficiency_png", "effective_rank_png", "alignment_png"]

_DPI = 110


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    """The line charts' axis labels, title, light grid and small legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=_DPI, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def loss_curves_png(runs: list[RunSummary], path: Path, threshold: Optional[float] = None) -> Path:
    """Training loss per optimizer step (raw, thin; trailing mean, bold) and validation loss (markers)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        steps, loss = run.loss
        ax.plot(steps, loss, color=c, alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(loss), color=c, linewidth=2, label=f"{run.label} train (smoothed)")
        vs, vl = run.val_loss
        if vl.size:
            ax.plot(vs, vl, color=c, linestyle="--", marker="o", label=f"{run.label} validation")
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="grey", linestyle=":", linewidth=1, label=f"threshold {threshold:.4g}")
    _label(ax, "optimizer step", "loss (response tokens, nats)", "Training and validation loss")
    return _save(fig, path)


def efficiency_png(runs: list[RunSummary], path: Path) -> Path:
    """Bars per run: median seconds per optimizer step, median tokens/s, peak memory (GiB)."""
    plt = _pyplot()
    panels = [("step_time_s", "s / optimizer step"), ("tokens_per_s", "tokens / s"), ("peak_memory_gib", "peak memory (GiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 3.6))
    labels = [r.label for r in runs]
    x = np.arange(len(runs))
    for ax, (attr, title) in zip(axes, panels):
        values = [getattr(r, attr) for r in runs]
        heights = [v if math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(x, heights, color=[f"C{i}" for i in range(len(runs))])
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if not math.isfinite(v) else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, labels, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    kinds = sorted({r.memory_kind for r in runs if r.memory_kind})
    if kinds:
        axes[-1].set_xlabel(", ".join(kinds), fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def effective_rank_png(runs: list[RunSummary], path: Path) -> Optional[Path]:
    """GRIT effective rank per adapted module (from ``effective_rank.json``) against the LoRA rank r; None without data."""
    with_ranks = [r for r in runs if r.effective_ranks]
    if not with_ranks:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for run in with_ranks:
        i = runs.index(run)  # the run's colour in the other charts
        entries = list(run.effective_ranks.values())
        ax.plot(np.arange(len(entries)), [e.get("effective_rank", math.nan) for e in entries], marker=".",
                linestyle="-", color=f"C{i}", label=f"{run.label} effective rank")
        ax.plot(np.arange(len(entries)), [e.get("r", math.nan) for e in entries], linestyle=":", color=f"C{i}",
                label=f"{run.label} LoRA rank r")
    _label(ax, "adapted module (model order)", "rank", "GRIT effective rank per module")
    return _save(fig, path)


def alignment_png(curves: dict, methods: dict[str, str], path: Path) -> Optional[Path]:
    """Delta bounded AQI (tuned - base) per monitor check with its 95% band, one panel per method side by side.

    ``curves``: ``{run label: (checks, choice)}`` of :func:`fteval.analysis.alignment_curve.run_alignment`;
    ``methods``: run label -> method. The chosen checkpoint of each run is circled. None without curves.
    """
    if not curves:
        return None
    plt = _pyplot()
    panels = sorted({methods[label] for label in curves}, key=order_key)  # in fteval.methods' order
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), sharey=True, squeeze=False)
    labels = list(methods)
    for ax, method in zip(axes[0], panels):
        for label, (checks, choice) in curves.items():
            if methods[label] != method:
                continue
            c = f"C{labels.index(label)}"  # the run's colour in the other charts
            steps = [k.step for k in checks]
            ax.plot(steps, [k.delta for k in checks], color=c, marker="o", linewidth=2, label=label)
            banded = [k for k in checks if k.delta_low is not None and k.delta_high is not None]
            if banded:
                ax.fill_between([k.step for k in banded], [k.delta_low for k in banded], [k.delta_high for k in banded],
                                color=c, alpha=0.18, linewidth=0)
            if choice is not None:
                ax.plot([choice.check.step], [choice.check.delta], marker="o", markersize=12, fillstyle="none",
                        color="black", linestyle="none", label=f"{label} chosen step {choice.check.step}")
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=1)
        ax.set_title(display_name(method))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("Delta AQI (bounded), tuned - base")
    fig.suptitle("Alignment over training (95% intervals)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)
