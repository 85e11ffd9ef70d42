"""Training runs as the experiment database recorded them: curves, convergence, speed, memory, adapter size.

:func:`load_runs` reads every ``fit`` experiment with per-step metrics (``training_metrics``, any
method of :mod:`fteval.methods`) and the adapter folder its ``model_artifacts`` row points to, and
returns one :class:`RunSummary` per run. ``fteval compare`` tabulates and tests them;
``fteval report`` reuses them for the cost analysis. Nothing here writes.

Definitions (units in brackets):

* loss curve: ``train/loss`` (else ``loss``) per optimizer step; validation: ``val/loss``.
* smoothed loss: trailing mean over the last ``SMOOTH_WINDOW`` logged steps (fewer at the start).
* final train loss: the last logged value; ``final_train_loss_smoothed`` its trailing mean.
* steps to threshold: the first step whose smoothed loss is <= the threshold [optimizer steps].
* stability: standard deviation of the step-to-step loss differences over the last
  ``STABILITY_WINDOW`` steps (lower = steadier) [loss units].
* time per step and tokens/s: medians over steps, robust to the first step's warm-up
  [s, real (unpadded) tokens per s]; fit time: ``time/fit_s`` (else the sum of step times) [s].
* peak memory: max of ``memory/peak_alloc_gib`` (CUDA allocated) or ``perf/peak_mem_gib``
  (CUDA allocated on GPU, the process resident set size on CPU) [GiB].
* trainable parameters: elements of the tensors in ``adapter_model.safetensors`` (the LoRA
  A/B factors as exported; read from the header, no tensor is loaded).
* GRIT effective rank: ``effective_rank.json`` written beside a GRIT adapter; effective
  parameters = sum over layers of ``effective_rank * (d_in + d_out)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fteval.db import ExperimentDB
from fteval.db.connection import inspect_file
from fteval.methods import REGISTRY

__all__ = [
    "RunSummary", "SMOOTH_WINDOW", "STABILITY_WINDOW", "open_database", "load_runs", "smooth", "steps_to_threshold",
    "stability", "common_threshold", "adapter_parameters",
]

SMOOTH_WINDOW = 5  # logged steps in the trailing mean of the loss
STABILITY_WINDOW = 10  # last steps whose loss differences make the stability figure
LOSS_NAMES = ("train/loss", "loss")
VAL_LOSS_NAMES = ("val/loss", "val_loss")
STEP_TIME_NAMES = ("perf/step_s", "time/step_s")
TOKENS_NAMES = ("perf/tokens_per_s",)
CUDA_MEMORY_NAMES = ("memory/peak_alloc_gib",)
PERF_MEMORY_NAMES = ("perf/peak_mem_gib",)


@dataclass
class RunSummary:
    """One fit run: its curves and the figures ``compare`` reports (NaN / None = not recorded)."""

    id: int
    name: str
    method: str
    status: str
    seed: Optional[int]
    device: str  # "cpu" or "cuda"
    device_name: str  # e.g. "2-core CPU" or "NVIDIA H200 x1"
    world_size: int
    started_at: str
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)  # name -> (steps [n], values [n])
    n_steps: int = 0
    final_train_loss: float = math.nan
    final_train_loss_smoothed: float = math.nan
    final_val_loss: float = math.nan
    best_val_loss: float = math.nan
    steps_to_threshold: Optional[int] = None
    stability: float = math.nan
    step_time_s: float = math.nan
    tokens_per_s: float = math.nan
    peak_memory_gib: float = math.nan
    memory_kind: str = ""
    fit_seconds: float = math.nan
    adapter_path: Optional[str] = None
    adapter_size_bytes: Optional[int] = None
    adapter_artifact_id: Optional[int] = None  # its model_artifacts row
    trainable_params: Optional[int] = None
    lora_rank: Optional[int] = None
    effective_rank_mean: Optional[float] = None
    effective_params: Optional[int] = None
    effective_ranks: Optional[dict[str, dict[str, Any]]] = field(default=None, repr=False)
    method_metrics: dict[str, float] = field(default_factory=dict)  # last value of each of its method's own metrics (grit/*)

    @property
    def label(self) -> str:
        """Unique, readable run name used in tables and charts: ``<method>#<experiment id>``."""
        return f"{self.method}#{self.id}"

    def curve(self, *names: str) -> tuple[np.ndarray, np.ndarray]:
        """The first of ``names`` that was recorded, as (steps, values); empty arrays when none was."""
        for name in names:
            if name in self.curves:
                return self.curves[name]
        return np.zeros(0, dtype=np.int64), np.zeros(0)

    @property
    def loss(self) -> tuple[np.ndarray, np.ndarray]:
        return self.curve(*LOSS_NAMES)

    @property
    def val_loss(self) -> tuple[np.ndarray, np.ndarray]:
        return self.curve(*VAL_LOSS_NAMES)


def open_database(db_path: Path) -> ExperimentDB:
    """Open an existing experiment database; a clear error when it is missing or not one."""
    db_path = Path(db_path)
    if not db_path.is_file() or inspect_file(db_path) is None:
        what = "is empty" if db_path.is_file() else "does not exist"
        raise FileNotFoundError(
            f"The experiment database {db_path} {what}. Run a fine-tune first "
            "(python -m fteval fit --config configs/qlora.yaml, then configs/grit.yaml) or pass --db_path."
        )
    return ExperimentDB(db_path)


def smooth(values: np.ndarray, window: int = SMOOTH_WINDOW) -> np.ndarray:
    """Trailing mean over ``window`` values (fewer at the start): ``out[i] = mean(values[max(0, i-w+1):i+1])``."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(values.size)
    lo = np.maximum(0, idx - window + 1)
    return (csum[idx + 1] - csum[lo]) / (idx + 1 - lo)


def steps_to_threshold(steps: np.ndarray, values: np.ndarray, threshold: float) -> Optional[int]:
    """First step whose smoothed loss is <= ``threshold``; None when the run never gets there."""
    hit = np.nonzero(smooth(values) <= threshold + 1e-12)[0]
    return int(steps[hit[0]]) if hit.size else None


def stability(values: np.ndarray, window: int = STABILITY_WINDOW) -> float:
    """Standard deviation (ddof=1) of the last ``window`` step-to-step loss differences; NaN below 2."""
    diffs = np.diff(np.asarray(values, dtype=np.float64)[-(window + 1):])
    return float(np.std(diffs, ddof=1)) if diffs.size >= 2 else math.nan


def common_threshold(runs: list[RunSummary]) -> float:
    """The default loss threshold: the highest smoothed final loss among the runs, so every run reaches it
    and the steps it took are comparable. NaN without runs that have a loss curve."""
    finals = [r.final_train_loss_smoothed for r in runs if math.isfinite(r.final_train_loss_smoothed)]
    return max(finals) if finals else math.nan


def adapter_parameters(adapter_dir: Path) -> tuple[Optional[int], dict[str, tuple[int, int, int]]]:
    """Trainable parameters of a PEFT adapter folder from its safetensors header.

    Returns:
        (total elements or None when there is no ``adapter_model.safetensors``,
        ``{module path: (rank, d_in, d_out)}`` for every LoRA A/B pair found).
    """
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        return None, {}
    from safetensors import safe_open

    total, shapes = 0, {}
    with safe_open(str(weights), framework="pt") as fh:
        for key in fh.keys():
            shape = fh.get_slice(key).get_shape()  # header only
            total += int(np.prod(shape)) if shape else 1
            shapes[key] = shape
    modules: dict[str, tuple[int, int, int]] = {}
    for key, shape in shapes.items():
        if ".lora_A." in key and len(shape) == 2:
            b_key = key.replace(".lora_A.", ".lora_B.")
            if b_key in shapes:
                module = key.split(".lora_A.")[0]
                modules[module] = (int(shape[0]), int(shape[1]), int(shapes[b_key][0]))
    return total, modules


def _module_key(name: str) -> str:
    """Module path without the PEFT/Lightning wrappers, for matching effective_rank.json to adapter keys."""
    for prefix in ("base_model.model.", "model.base_model.model.", "_orig_mod."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _read_effective_ranks(adapter_dir: Path, run: RunSummary, modules: dict[str, tuple[int, int, int]]) -> None:
    path = adapter_dir / "effective_rank.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    layers = data.get("layers") or {}
    run.effective_ranks = layers
    if "mean_effective_rank" in data:
        run.effective_rank_mean = float(data["mean_effective_rank"])
    by_key = {_module_key(m): dims for m, dims in modules.items()}
    total, matched = 0, 0
    for name, entry in layers.items():
        dims = by_key.get(_module_key(name))
        if dims is not None and entry.get("effective_rank") is not None:
            total += int(entry["effective_rank"]) * (dims[1] + dims[2])
            matched += 1
    if layers and matched == len(layers):
        run.effective_params = total


def _device(hardware: Optional[dict], world_size: int) -> tuple[str, str]:
    hardware = hardware or {}
    gpus = hardware.get("gpus") or []
    if hardware.get("cuda_available") and gpus:
        names = sorted({str(g.get("name", "GPU")) for g in gpus})
        return "cuda", f"{' / '.join(names)} x{world_size}"
    cores = hardware.get("cpu_usable") or hardware.get("cpu_count")
    return "cpu", f"{cores}-core CPU" if cores else "CPU"


def _summarise(db: ExperimentDB, exp: dict[str, Any]) -> RunSummary:
    config = exp.get("config") or {}
    trainer_cfg = config.get("trainer") or {}
    world_size = int(trainer_cfg.get("world_size") or 1)
    device, device_name = _device(exp.get("hardware"), world_size)
    rows = db.metrics(exp["id"])
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    by_name: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["value"] is not None and math.isfinite(r["value"]):
            by_name.setdefault(r["name"], []).append((int(r["step"]), float(r["value"])))
    for name, pairs in by_name.items():
        last: dict[int, float] = {}
        for step, value in pairs:  # a re-logged step keeps its last value
            last[step] = value
        steps = np.array(sorted(last), dtype=np.int64)
        curves[name] = (steps, np.array([last[s] for s in steps], dtype=np.float64))
    hparams = config.get("hparams") or {}
    run = RunSummary(
        id=int(exp["id"]), name=str(exp["name"]), method=str(exp["method"]), status=str(exp["status"]),
        seed=exp.get("seed"), device=device, device_name=device_name, world_size=world_size,
        started_at=str(exp["started_at"]), curves=curves,
        lora_rank=int(hparams["r"]) if isinstance(hparams.get("r"), int) else None,
    )
    steps, loss = run.loss
    if loss.size:
        run.n_steps = int(steps[-1])
        run.final_train_loss = float(loss[-1])
        run.final_train_loss_smoothed = float(smooth(loss)[-1])
        run.stability = stability(loss)
    _, val = run.val_loss
    if val.size:
        run.final_val_loss, run.best_val_loss = float(val[-1]), float(val.min())
    _, step_s = run.curve(*STEP_TIME_NAMES)
    if step_s.size:
        run.step_time_s = float(np.median(step_s))
    _, tps = run.curve(*TOKENS_NAMES)
    if tps.size:
        run.tokens_per_s = float(np.median(tps))
    _, cuda_mem = run.curve(*CUDA_MEMORY_NAMES)
    _, perf_mem = run.curve(*PERF_MEMORY_NAMES)
    if cuda_mem.size:
        run.peak_memory_gib, run.memory_kind = float(cuda_mem.max()), "CUDA allocated"
    elif perf_mem.size:
        run.peak_memory_gib = float(perf_mem.max())
        run.memory_kind = "CUDA allocated" if device == "cuda" else "process RSS"
    _, fit_s = run.curve("time/fit_s")
    _, raw_step_s = run.curve("time/step_s", "perf/step_s")
    if fit_s.size:
        run.fit_seconds = float(fit_s[-1])
    elif raw_step_s.size:
        run.fit_seconds = float(raw_step_s.sum())
    prefixes = tuple(p for m in REGISTRY.values() for p in m.metric_prefixes)  # methods' own metrics
    for name, (_, values) in curves.items():
        if prefixes and name.startswith(prefixes) and values.size:
            run.method_metrics[name] = float(values[-1])
    adapters = [a for a in db.artifacts(run.id) if a["kind"] == "adapter"]
    if adapters:
        art = adapters[-1]
        run.adapter_path, run.adapter_size_bytes = str(art["path"]), int(art["size_bytes"])
        run.adapter_artifact_id = int(art["id"])
        folder = Path(art["path"])
        if folder.is_dir():
            run.trainable_params, modules = adapter_parameters(folder)
            if run.lora_rank is None and modules:
                run.lora_rank = max(m[0] for m in modules.values())
            _read_effective_ranks(folder, run, modules)
    return run


def load_runs(db: ExperimentDB, experiments: Optional[list[int]] = None) -> list[RunSummary]:
    """Summaries of the fit runs with a training loss curve, oldest first.

    Args:
        db: an open experiment database.
        experiments: experiment ids to keep (None = every fit run of a training method).

    Raises:
        ValueError: an id is unknown, not a fit run, or has no loss curve; or no run qualifies.
    """
    fits = db.experiments(stage="fit")
    if experiments:
        known = {e["id"]: e for e in db.experiments()}
        wanted = []
        for eid in experiments:
            exp = known.get(int(eid))
            if exp is None:
                raise ValueError(f"--experiments: no experiment with id {eid} in {db.path}; "
                                 f"fit runs there are {[e['id'] for e in fits] or 'none'}.")
            if exp["stage"] != "fit":
                raise ValueError(f"--experiments: experiment {eid} is a {exp['stage']!r} run ({exp['method']}), "
                                 f"not a training run; fit runs are {[e['id'] for e in fits] or 'none'}.")
            wanted.append(exp)
        fits = wanted
    runs = [_summarise(db, e) for e in fits]
    if experiments:
        empty = [r.id for r in runs if not r.loss[1].size]
        if empty:
            raise ValueError(f"--experiments: run(s) {empty} recorded no training loss (did they fail at the start?).")
    runs = [r for r in runs if r.loss[1].size]
    if not runs:
        raise ValueError(
            f"{db.path} holds no training run with a loss curve. Run python -m fteval fit --config configs/qlora.yaml "
            "(and configs/grit.yaml) with the ExperimentDBLogger callback writing to this database, or pass --db_path."
        )
    return runs
