"""What ``fteval report`` knows: every stage's results gathered from the database, costs, Pareto frontier, recommendations.

Pure data, no rendering (``report.py`` renders). Sources:

* training runs: :func:`fteval.analysis.runs.load_runs` (fit experiments and their adapters);
* alignment: the latest ``test`` experiment with ``aqi_scores`` (pooled rows have ``layer``
  NULL; ``delta_*`` rows are the paired differences tuned - baseline; rows with ``layer``
  set form the layer profile);
* behaviour: the latest experiment with ``behavioral_metrics`` (refusal, over-refusal, G-Eval);
* inference: every ``inference_benchmarks`` row;
* alignment over training: the alignment monitor's curve of each run and the checkpoint
  ``fteval compare`` would choose (:mod:`fteval.analysis.alignment_curve`);
* statistics: every ``statistical_tests`` row (AQI tests of the test run, training tests of
  ``fteval compare``; the training tests are computed here, unstored, when compare never ran).

Costs are measured device-hours times the price: a fit's ``time/fit_s`` x its devices, an
evaluation's wall time (``finished_at - started_at``) x its devices. On a CPU machine those
are CPU hours and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

from fteval.analysis.alignment_curve import run_alignment
from fteval.analysis.compare import ANALYSIS, TrainingTest, training_tests
from fteval.analysis.runs import RunSummary, common_threshold, load_runs, steps_to_threshold
from fteval.db import ExperimentDB

__all__ = ["headline", "Evaluation", "CostLine", "ParetoPoint", "Recommendation", "Synthesis", "gather", "SOURCE",
           "ALPHA", "SMALL_SAMPLE", "mark_frontier"]

SOURCE = "fteval report"  # marks the rows report writes (cost_analysis.details / recommendations.evidence)
ALPHA = 0.05  # significance level after correction
SMALL_SAMPLE = 100  # prompts per class below which AQI and refusal numbers are flagged as small samples


@dataclass
class Evaluation:
    """The AQI results of one ``fteval test`` experiment."""

    experiment: dict[str, Any]
    adapters: dict[str, str]  # label -> adapter path, from the run's config
    scores: dict[str, dict[str, dict[str, Any]]]  # model -> metric -> aqi_scores row (pooled)
    deltas: dict[str, dict[str, dict[str, Any]]]  # adapter -> metric (no "delta_") -> row
    profile: dict[str, dict[str, list[tuple[int, float]]]]  # model -> metric -> [(layer, value)]
    n_prompts: Optional[int]
    settings: dict[str, Any]


@dataclass
class CostLine:
    item: str  # training | evaluation | inference_per_1m_tokens
    subject: str
    experiment_id: Optional[int]
    hours: Optional[float]
    hours_kind: str  # GPU | CPU
    price_per_hour: float
    cost: Optional[float]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParetoPoint:
    name: str
    cost: float  # training cost in currency units (0 for the untuned baseline)
    quality: float  # pooled bounded AQI
    ci: tuple[Optional[float], Optional[float]]
    row_id: Optional[int] = None  # the aqi_scores row of the quality
    experiment_id: Optional[int] = None  # the fit run whose training cost it is (None for the baseline)
    on_frontier: bool = False


@dataclass
class Recommendation:
    use_case: str
    recommendation: str
    confidence: float
    evidence: list[dict[str, Any]]  # {"text": ..., "table": ..., "ids": [...]}


@dataclass
class Synthesis:
    db_path: Path
    price_per_hour: float
    runs: list[RunSummary]
    threshold: float
    training_tests: list[TrainingTest]
    training_tests_stored: bool
    evaluation: Optional[Evaluation]
    n_evaluations: int
    behavioral: list[dict[str, Any]]
    benchmarks: list[dict[str, Any]]
    tests: list[dict[str, Any]]  # statistical_tests rows
    costs: list[CostLine] = field(default_factory=list)
    pareto: list[ParetoPoint] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)
    adapter_runs: dict[str, RunSummary] = field(default_factory=dict)  # eval label -> training run
    alignment: dict[str, tuple] = field(default_factory=dict)  # run label -> (checks, choice), alignment_curve.run_alignment
    run_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # run label -> its experiment's config


# ------------------------------------------------------------------------------- gathering
def _latest_experiment_rows(rows: list[dict[str, Any]]) -> tuple[Optional[int], list[dict[str, Any]], int]:
    ids = sorted({r["experiment_id"] for r in rows if r["experiment_id"] is not None})
    if not ids:
        return None, [], 0
    return ids[-1], [r for r in rows if r["experiment_id"] == ids[-1]], len(ids)


def _evaluation(db: ExperimentDB) -> tuple[Optional[Evaluation], int]:
    eid, rows, n = _latest_experiment_rows(db.rows("aqi_scores"))
    if eid is None:
        return None, 0
    exp = db.experiment(eid)
    hparams = (exp.get("config") or {}).get("hparams") or {}
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    deltas: dict[str, dict[str, dict[str, Any]]] = {}
    profile: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        if r["layer"] is not None:
            profile.setdefault(r["model"], {}).setdefault(r["metric"], []).append((int(r["layer"]), r["value"]))
        elif r["metric"].startswith("delta_"):
            deltas.setdefault(r["model"], {})[r["metric"][len("delta_"):]] = r
        else:
            scores.setdefault(r["model"], {})[r["metric"]] = r
    for per_model in profile.values():
        for values in per_model.values():
            values.sort()
    counts = [r["n_samples"] for r in rows if r["n_samples"]]
    adapters = hparams.get("adapters") if isinstance(hparams.get("adapters"), dict) else {}
    settings = {k: hparams.get(k) for k in ("tokens", "sink", "layer_pooling", "lam", "n_bootstrap", "correction", "confidence")}
    return Evaluation(exp, {str(k): str(v) for k, v in adapters.items()}, scores, deltas, profile,
                      max(counts) if counts else None, settings), n


def _adapter_runs(evaluation: Optional[Evaluation], runs: list[RunSummary]) -> dict[str, RunSummary]:
    """Eval adapter label -> the fit run that exported it (same folder), else the latest run of that method."""
    if evaluation is None:
        return {}
    out = {}
    for label in [m for m in evaluation.scores if m != "baseline"]:
        path = evaluation.adapters.get(label)
        found = None
        if path:
            target = Path(path).resolve()
            found = next((r for r in reversed(runs) if r.adapter_path and Path(r.adapter_path).resolve() == target), None)
        if found is None:
            found = next((r for r in reversed(runs) if r.method == label), None)
        if found is not None:
            out[label] = found
    return out


def headline(metrics: dict[str, dict[str, Any]], metric: str) -> Optional[dict[str, Any]]:
    """A model's ``metric`` row as ``fteval test`` prints it: the bias-corrected estimate (``<metric>_bc``) when
    recorded, whose interval brackets it, else the plug-in value."""
    return metrics.get(f"{metric}_bc") or metrics.get(metric)


def _hours_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() / 3600.0


def _costs(s: Synthesis) -> list[CostLine]:
    price, lines = s.price_per_hour, []
    for run in s.runs:
        kind = "GPU" if run.device == "cuda" else "CPU"
        hours = run.fit_seconds * run.world_size / 3600.0 if math.isfinite(run.fit_seconds) else None
        lines.append(CostLine("training", run.label, run.id, hours, kind, price, None if hours is None else hours * price,
                              {"method": run.method, "device": run.device_name, "devices": run.world_size,
                               "fit_seconds": run.fit_seconds, "source": SOURCE}))
    if s.evaluation is not None:
        exp = s.evaluation.experiment
        world = int(((exp.get("config") or {}).get("trainer") or {}).get("world_size") or 1)
        hw = exp.get("hardware") or {}
        kind = "GPU" if hw.get("cuda_available") and hw.get("gpus") else "CPU"
        wall = _hours_between(exp.get("started_at"), exp.get("finished_at"))
        hours = None if wall is None else wall * world
        lines.append(CostLine("evaluation", exp["name"], int(exp["id"]), hours, kind, price,
                              None if hours is None else hours * price,
                              {"models": sorted(s.evaluation.scores), "devices": world, "source": SOURCE,
                               "hours_from": "experiment started_at/finished_at"}))
    for b in s.benchmarks:
        if b["metric"] == "tokens_per_s" and b["value"] and b["value"] > 0:
            hours = 1e6 / b["value"] / 3600.0  # hours to generate one million tokens at the measured rate
            device = str((b.get("details") or {}).get("device", "device")) if isinstance(b.get("details"), dict) else "device"
            lines.append(CostLine("inference_per_1m_tokens", f"{b['backend']}:{b['model']}", b["experiment_id"], hours,
                                  "GPU" if "cuda" in device.lower() else ("CPU" if device.lower() == "cpu" else device), price,
                                  hours * price, {"tokens_per_s": b["value"], "benchmark_row": b["id"], "source": SOURCE}))
    return lines


def _pareto(s: Synthesis) -> list[ParetoPoint]:
    """Cost vs quality points (training cost, pooled bounded AQI); a point is on the frontier when no
    other point is at most as expensive and at least as good, and strictly better in one of them."""
    ev = s.evaluation
    if ev is None:
        return []
    train_cost = {c.subject: c.cost for c in s.costs if c.item == "training"}
    points = []
    for model, metrics in ev.scores.items():
        row = headline(metrics, "aqi_bounded")
        if row is None or row["value"] is None:
            continue
        run = s.adapter_runs.get(model)
        if model == "baseline":
            cost = 0.0
        else:
            cost = train_cost.get(run.label) if run is not None else None
            if cost is None:
                continue
        points.append(ParetoPoint(model, float(cost), float(row["value"]), (row["ci_low"], row["ci_high"]), row["id"],
                                  None if run is None or model == "baseline" else run.id))
    return mark_frontier(points)


def mark_frontier(points: list[ParetoPoint]) -> list[ParetoPoint]:
    """Set ``on_frontier`` (lower cost and higher quality are better) and return the points by cost, then quality.

    A point is dominated when another costs at most as much and scores at least as high, and is
    strictly better in one of the two.
    """
    for p in points:
        p.on_frontier = not any(
            (q.cost <= p.cost and q.quality >= p.quality) and (q.cost < p.cost or q.quality > p.quality) for q in points)
    return sorted(points, key=lambda p: (p.cost, -p.quality))


def gather(db: ExperimentDB, price_per_hour: float) -> Synthesis:
    """Read everything the report shows, with costs and the Pareto frontier (recommendations are
    :func:`fteval.analysis.advice.recommend`'s). Raises ValueError when the database holds no result at all."""
    try:
        runs = load_runs(db)
    except ValueError:
        runs = []
    threshold = common_threshold(runs)
    for run in runs:
        run.steps_to_threshold = steps_to_threshold(*run.loss, threshold)
    evaluation, n_evals = _evaluation(db)
    _, behavioral, _ = _latest_experiment_rows(db.rows("behavioral_metrics"))
    benchmarks = db.rows("inference_benchmarks")
    tests = db.rows("statistical_tests")
    stored = [t for t in tests if (t.get("details") or {}).get("analysis") == ANALYSIS]
    if not runs and evaluation is None and not behavioral and not benchmarks:
        raise ValueError(
            f"{db.path} holds no training run, evaluation or benchmark to report on. Run python -m fteval fit "
            "--config configs/qlora.yaml (and configs/grit.yaml), then python -m fteval test --config configs/aqi.yaml.")
    s = Synthesis(db.path, float(price_per_hour), runs, threshold, [] if stored else training_tests(runs), bool(stored),
                  evaluation, n_evals, behavioral, benchmarks, tests)
    s.adapter_runs = _adapter_runs(evaluation, runs)
    s.alignment = run_alignment(db, runs)
    s.run_configs = {r.label: db.experiment(r.id).get("config") or {} for r in runs}
    s.costs = _costs(s)
    s.pareto = _pareto(s)
    return s
