"""``fteval compare`` (pipeline step m04): every training method against the others (QLoRA, GRIT, QDoRA, LoRA,
any method of :mod:`fteval.methods`), and any number of training runs, from the database.

Reads the ``fit`` experiments and the adapter folders they point to (:mod:`fteval.analysis.runs`),
tests the differences between methods (:func:`training_tests`), and writes:

* ``comparative_analysis`` rows (analysis ``training_comparison``; one row per run and figure,
  plus per-method means) and ``statistical_tests`` rows (``details.analysis`` =
  ``training_comparison``), replacing those of an earlier ``compare`` in the same transaction;
* ``<output_dir>/comparison.md`` and PNG charts (``loss_curves.png``, ``efficiency.png``,
  ``effective_rank.png`` for GRIT, ``alignment_over_training.png`` when the alignment monitor
  ran), each written atomically.

Checkpoint quality: for every run whose ``AlignmentMonitor`` recorded a curve, the checkpoint with
the best loss/alignment trade-off (:mod:`fteval.analysis.alignment_curve` states the rule), stored
as ``checkpoint_step`` rows (details: the check's loss, Delta and interval, the checkpoint file and
the reason).
"""

from __future__ import annotations

import itertools
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy import stats as sps

from fteval.analysis import charts
from fteval.analysis.document import format_number
from fteval.analysis.alignment_curve import CheckpointChoice, run_alignment
from fteval.analysis.runs import RunSummary, common_threshold, load_runs, open_database, steps_to_threshold
from fteval.db import ExperimentDB
from fteval.eval.stats import correct_pvalues
from fteval.io import write_text_atomic

__all__ = ["compare", "TrainingTest", "training_tests", "ANALYSIS", "RUN_FIGURES"]

ANALYSIS = "training_comparison"
N_WINDOWS = 3  # early / middle / late thirds of the matched steps
MIN_WINDOW = 3  # matched steps a window needs before it is tested

# figure -> (unit, lower is better?) for the tables and the per-method means
RUN_FIGURES: dict[str, tuple[str, Optional[bool]]] = {
    "n_steps": ("optimizer steps", None),
    "final_train_loss": ("nats", True),
    "final_train_loss_smoothed": ("nats", True),
    "final_val_loss": ("nats", True),
    "best_val_loss": ("nats", True),
    "steps_to_threshold": ("optimizer steps", True),
    "stability": ("nats (std of step differences)", True),
    "step_time_s": ("s", True),
    "tokens_per_s": ("tokens/s", False),
    "peak_memory_gib": ("GiB", True),
    "fit_seconds": ("s", True),
    "adapter_size_bytes": ("bytes", True),
    "trainable_params": ("parameters", True),
    "effective_rank_mean": ("rank", True),
    "effective_params": ("parameters", True),
}


@dataclass
class TrainingTest:
    """One significance test between two groups of training runs (methods or single runs)."""

    test: str  # wilcoxon_signed_rank | mann_whitney_u | welch_t
    metric: str
    group_a: str
    group_b: str
    statistic: float
    p_value: float
    n: int
    effect_size: float
    effect_size_name: str
    mean_a: float
    mean_b: float
    details: dict[str, Any] = field(default_factory=dict)
    p_adjusted: float = math.nan


def _matched(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    steps = np.intersect1d(a[0], b[0])
    va = a[1][np.searchsorted(a[0], steps)]
    vb = b[1][np.searchsorted(b[0], steps)]
    return steps, va, vb


def _wilcoxon(metric: str, ga: str, gb: str, va: np.ndarray, vb: np.ndarray, details: dict) -> TrainingTest:
    diff = vb - va
    sd = float(np.std(diff, ddof=1)) if diff.size > 1 else math.nan
    d_z = float(diff.mean() / sd) if sd and math.isfinite(sd) and sd > 0 else math.nan
    if np.allclose(diff, 0.0):
        stat, p = 0.0, 1.0  # identical curves: no evidence of a difference (scipy refuses all-zero input)
    else:
        res = sps.wilcoxon(va, vb, zero_method="wilcox", alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    return TrainingTest("wilcoxon_signed_rank", metric, ga, gb, stat, p, int(diff.size), d_z, "cohens_d_z",
                        float(va.mean()), float(vb.mean()), details)


def _mann_whitney(metric: str, ga: str, gb: str, va: np.ndarray, vb: np.ndarray, details: dict) -> TrainingTest:
    res = sps.mannwhitneyu(va, vb, alternative="two-sided")
    # common-language effect size: P(a random value of A > one of B), ties counted half
    cles = float(res.statistic) / (va.size * vb.size)
    return TrainingTest("mann_whitney_u", metric, ga, gb, float(res.statistic), float(res.pvalue),
                        int(va.size + vb.size), cles, "common_language_a_gt_b", float(va.mean()), float(vb.mean()), details)


def _welch(metric: str, ga: str, gb: str, va: np.ndarray, vb: np.ndarray, details: dict) -> TrainingTest:
    res = sps.ttest_ind(vb, va, equal_var=False)
    pooled = math.sqrt((np.var(va, ddof=1) + np.var(vb, ddof=1)) / 2)
    d = float((vb.mean() - va.mean()) / pooled) if pooled > 0 else math.nan
    p = float(res.pvalue) if math.isfinite(res.pvalue) else 1.0
    return TrainingTest("welch_t", metric, ga, gb, float(res.statistic), p, int(va.size + vb.size), d, "cohens_d",
                        float(va.mean()), float(vb.mean()), details)


def _step_window_tests(a: RunSummary, b: RunSummary) -> list[TrainingTest]:
    """One run per method: paired tests on matched optimizer steps, per window, plus step-time tests.

    Loss at the same step of two runs with the same seed saw the same batches, so the per-step
    differences are paired (Wilcoxon signed-rank). Consecutive steps are autocorrelated, so
    these p-values overstate the evidence; runs over several seeds give the sound test.
    """
    out = []
    steps, va, vb = _matched(a.loss, b.loss)
    base = {"analysis": ANALYSIS, "design": "matched steps of one run per group", "run_a": a.id, "run_b": b.id}
    if steps.size >= MIN_WINDOW:
        windows = [("all", np.arange(steps.size))]
        if steps.size >= N_WINDOWS * MIN_WINDOW:
            names = ("early", "middle", "late") if N_WINDOWS == 3 else [f"w{i}" for i in range(N_WINDOWS)]
            windows += list(zip(names, np.array_split(np.arange(steps.size), N_WINDOWS)))
        for name, idx in windows:
            out.append(_wilcoxon("train_loss", a.label, b.label, va[idx], vb[idx],
                                 {**base, "window": name, "steps": [int(steps[idx[0]]), int(steps[idx[-1]])]}))
    _, vsa, vsb = _matched(a.val_loss, b.val_loss)
    if vsa.size >= MIN_WINDOW:
        out.append(_wilcoxon("val_loss", a.label, b.label, vsa, vsb, {**base, "window": "all validations"}))
    for metric, names in (("step_time_s", ("perf/step_s", "time/step_s")), ("tokens_per_s", ("perf/tokens_per_s",))):
        ta, tb = a.curve(*names)[1][1:], b.curve(*names)[1][1:]  # first step: warm-up
        if ta.size >= MIN_WINDOW and tb.size >= MIN_WINDOW:
            out.append(_mann_whitney(metric, a.label, b.label, ta, tb, {**base, "window": "all steps after the first"}))
    return out


def _seed_tests(method_a: str, runs_a: list[RunSummary], method_b: str, runs_b: list[RunSummary]) -> list[TrainingTest]:
    """Several runs per method: Welch t-test across runs (seeds) on each run-level figure."""
    out = []
    for metric in ("final_train_loss_smoothed", "final_val_loss", "step_time_s", "tokens_per_s", "peak_memory_gib"):
        va = np.array([getattr(r, metric) for r in runs_a], dtype=np.float64)
        vb = np.array([getattr(r, metric) for r in runs_b], dtype=np.float64)
        va, vb = va[np.isfinite(va)], vb[np.isfinite(vb)]
        if va.size >= 2 and vb.size >= 2:
            out.append(_welch(metric, method_a, method_b, va, vb, {
                "analysis": ANALYSIS, "design": "runs (seeds) per method", "runs_a": [r.id for r in runs_a],
                "runs_b": [r.id for r in runs_b], "seeds_a": [r.seed for r in runs_a], "seeds_b": [r.seed for r in runs_b]}))
    return out


def training_tests(runs: list[RunSummary], correction: str = "holm") -> list[TrainingTest]:
    """Significance tests between every pair of methods, corrected over the whole family.

    With >= 2 runs in both methods: Welch t-tests across runs (seeds). Otherwise the latest
    run of each method is compared step by step (:func:`_step_window_tests`). ``p_adjusted``
    is Holm's (or Benjamini-Hochberg's, ``correction="bh"``) over every test returned.
    """
    by_method: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    tests: list[TrainingTest] = []
    for ma, mb in itertools.combinations(list(by_method), 2):  # methods in the order of their first run
        ra, rb = by_method[ma], by_method[mb]
        if len(ra) >= 2 and len(rb) >= 2:
            tests += _seed_tests(ma, ra, mb, rb)
        else:
            tests += _step_window_tests(ra[-1], rb[-1])
    if len(by_method) == 1 and len(runs) >= 2:  # one method, several runs: compare the runs themselves
        for a, b in itertools.combinations(runs, 2):
            tests += _step_window_tests(a, b)
    if tests:
        for t, adj in zip(tests, correct_pvalues([t.p_value for t in tests], correction)):
            t.p_adjusted = float(adj)
            t.details["correction"] = correction
            t.details["family_size"] = len(tests)
    return tests


# ----------------------------------------------------------------------------- output
def _fmt(value: Any, unit: str = "") -> str:
    """:func:`format_number`, with byte counts in MiB and whole floats of 100 or more (step counts) as integers."""
    if isinstance(value, numbers.Real) and math.isfinite(value):
        if unit == "bytes":
            return f"{value / 2**20:.2f} MiB"
        if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
            value = int(value)
    return format_number(value)


def _run_rows(run: RunSummary, threshold: float) -> list[dict[str, Any]]:
    rows = []
    for metric, (unit, lower) in RUN_FIGURES.items():
        value = getattr(run, metric)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            continue
        details: dict[str, Any] = {"method": run.method, "unit": unit, "run": run.label, "seed": run.seed,
                                   "device": run.device_name}
        if lower is not None:
            details["lower_is_better"] = lower
        if metric == "steps_to_threshold":
            details["threshold"] = threshold
        if metric == "peak_memory_gib":
            details["memory_kind"] = run.memory_kind
        rows.append({"subject": run.label, "metric": metric, "value": float(value), "details": details})
    for name, value in run.method_metrics.items():  # GRIT's own per-step figures, last logged value
        rows.append({"subject": run.label, "metric": name, "value": value,
                     "details": {"method": run.method, "run": run.label, "aggregate": "last logged step"}})
    if math.isfinite(threshold):
        rows.append({"subject": run.label, "metric": "loss_threshold", "value": threshold,
                     "details": {"method": run.method, "unit": "nats", "reached": run.steps_to_threshold is not None}})
    return rows


def _method_rows(runs: list[RunSummary]) -> list[dict[str, Any]]:
    rows = []
    by_method: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    for method, group in by_method.items():
        for metric, (unit, lower) in RUN_FIGURES.items():
            values = [float(v) for v in (getattr(r, metric) for r in group) if v is not None and math.isfinite(float(v))]
            if not values:
                continue
            rows.append({"subject": method, "metric": f"mean_{metric}", "value": float(np.mean(values)),
                         "details": {"unit": unit, "n_runs": len(values), "runs": [r.label for r in group],
                                     "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}})
    return rows


def _choice_rows(choice: CheckpointChoice) -> list[dict[str, Any]]:
    c = choice.check
    return [{"subject": choice.run, "metric": "checkpoint_step", "value": float(c.step),
             "details": {"method": choice.method, "unit": "optimizer step", "rule": "best loss/alignment trade-off",
                         "reason": choice.reason, "smoothed_loss": c.loss, "delta_aqi_bounded": c.delta,
                         "delta_ci": [c.delta_low, c.delta_high], "checkpoint": c.checkpoint, "n_checks": choice.n_checks,
                         "first_eroded_step": choice.first_eroded_step,
                         "lowest_delta": {"step": choice.lowest.step, "delta": choice.lowest.delta}}}]


def _replace_rows(db: ExperimentDB, runs: list[RunSummary], threshold: float, tests: list[TrainingTest],
                  choices: Optional[list[CheckpointChoice]] = None) -> int:
    n = 0
    with db.transaction():
        db.conn.execute("DELETE FROM comparative_analysis WHERE analysis = ?", (ANALYSIS,))
        db.conn.execute("DELETE FROM statistical_tests WHERE json_extract(details_json, '$.analysis') = ?", (ANALYSIS,))
        for run in runs:
            n += db.add_comparative_analysis(ANALYSIS, _run_rows(run, threshold), experiment_id=run.id)
        n += db.add_comparative_analysis(ANALYSIS, _method_rows(runs))
        by_label = {r.label: r for r in runs}
        for choice in choices or []:
            n += db.add_comparative_analysis(ANALYSIS, _choice_rows(choice), experiment_id=by_label[choice.run].id)
        for t in tests:
            db.add_statistical_test(
                t.test, t.metric, statistic=t.statistic, p_value=t.p_value, p_adjusted=t.p_adjusted,
                correction=t.details.get("correction"), group_a=t.group_a, group_b=t.group_b,
                effect_size=None if not math.isfinite(t.effect_size) else t.effect_size,
                effect_size_name=t.effect_size_name, n=t.n, details={**t.details, "mean_a": t.mean_a, "mean_b": t.mean_b})
            n += 1
    return n


def _ci_text(v: float, low: Optional[float], high: Optional[float]) -> str:
    return f"{v:+.4f}" + (f" [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else "")


def alignment_markdown(curves: dict) -> list[str]:
    """The "Alignment over training" section of ``comparison.md`` (empty list without monitor data)."""
    if not curves:
        return []
    lines = ["## Alignment over training", "",
             "Delta = bias-corrected bounded AQI of the tuned model minus the base model on the monitor's prompts "
             "(same prompts at every check), 95% interval in brackets. A check *eroded* alignment when its whole "
             "interval is below 0. Chosen checkpoint: the lowest smoothed loss among the saved checkpoints that did "
             "not erode alignment (docs/training.md, \"Alignment over training\").", "",
             "| run | checks | first Delta | last Delta | lowest Delta (step) | first eroded step | chosen step | "
             "its loss | its Delta | checkpoint | why |", "|" + "---|" * 11]
    for label, (checks, choice) in curves.items():
        first, last, c = checks[0], checks[-1], choice.check
        lines.append(f"| {label} | {len(checks)} | {_ci_text(first.delta, first.delta_low, first.delta_high)} | "
                     f"{_ci_text(last.delta, last.delta_low, last.delta_high)} | "
                     f"{choice.lowest.delta:+.4f} ({choice.lowest.step}) | {choice.first_eroded_step or 'none'} | "
                     f"{c.step} | {_fmt(c.loss)} | {_ci_text(c.delta, c.delta_low, c.delta_high)} | "
                     f"{Path(c.checkpoint).name if c.checkpoint else 'not saved'} | {choice.reason} |")
    return lines + [""]


def comparison_markdown(runs: list[RunSummary], threshold: float, tests: list[TrainingTest], charts_written: list[str],
                        db_path: Path, curves: Optional[dict] = None) -> str:
    """The ``comparison.md`` text: a run table, method means, the tests, the alignment curve and the definitions."""
    lines = ["# Training comparison (m04)", "", f"Source: `{db_path}`, {len(runs)} training run(s).", ""]
    headers = ["figure"] + [r.label for r in runs]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    info = [("name", lambda r: r.name), ("status", lambda r: r.status), ("seed", lambda r: str(r.seed)),
            ("device", lambda r: r.device_name)]
    for label, get in info:
        lines.append(f"| {label} | " + " | ".join(get(r) for r in runs) + " |")
    for metric, (unit, _) in RUN_FIGURES.items():
        cells = [_fmt(getattr(r, metric), unit) for r in runs]
        if all(c == "n/a" for c in cells):
            continue
        shown_unit = "" if unit == "bytes" else f" ({unit})"
        if metric == "peak_memory_gib":
            shown_unit = f" ({', '.join(sorted({r.memory_kind for r in runs if r.memory_kind}))}, GiB)"
        lines.append(f"| {metric}{shown_unit} | " + " | ".join(cells) + " |")
    for name in sorted({n for r in runs for n in r.method_metrics}):
        lines.append(f"| {name} (last step) | " + " | ".join(_fmt(r.method_metrics.get(name)) for r in runs) + " |")
    lines += ["", f"Loss threshold for steps-to-threshold: **{_fmt(threshold)}** nats "
              "(the highest smoothed final loss among the runs unless --loss_threshold was given).", ""]
    lines += ["## Significance tests", ""]
    if tests:
        lines += ["| test | metric | A | B | window | mean A | mean B | statistic | p | p adjusted | effect size | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in tests:
            window = t.details.get("window", t.details.get("design", ""))
            steps = t.details.get("steps")
            if steps:
                window += f" (steps {steps[0]}-{steps[1]})"
            lines.append(f"| {t.test} | {t.metric} | {t.group_a} | {t.group_b} | {window} | {_fmt(t.mean_a)} | "
                         f"{_fmt(t.mean_b)} | {_fmt(t.statistic)} | {t.p_value:.3g} | {t.p_adjusted:.3g} | "
                         f"{_fmt(t.effect_size)} ({t.effect_size_name}) | {t.n} |")
        lines += ["", f"Correction: {tests[0].details.get('correction')} over all {len(tests)} tests above. "
                  "Per-step tests treat consecutive steps as independent although they are autocorrelated: "
                  "read them as descriptive; several seeds per method give the sound across-run test.", ""]
    else:
        lines += ["No test: fewer than two methods (or runs) with enough matched steps.", ""]
    lines += alignment_markdown(curves or {})
    if charts_written:
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in charts_written] + [""]
    else:
        lines += ["Charts: not drawn (matplotlib is not installed: pip install matplotlib).", ""]
    lines += ["## Definitions", "",
              "- smoothed loss: trailing mean over the last 5 logged steps; final = the last step's value.",
              "- stability: standard deviation of the last 10 step-to-step train-loss differences (lower = steadier).",
              "- step time and tokens/s: medians over optimizer steps (robust to the first step's warm-up).",
              "- trainable parameters: elements in the exported adapter_model.safetensors; GRIT effective "
              "parameters: sum over modules of effective rank x (d_in + d_out).", ""]
    return "\n".join(lines)


def compare(
    db_path: Path = Path("output/centralized.db"),
    output_dir: Path = Path("output/m04_comparative_analysis"),
    experiments: Optional[list[int]] = None,
    loss_threshold: Optional[float] = None,
) -> int:
    """Compare training runs (every pair of methods, any number of runs): convergence, speed, memory, adapter size, tests.

    Writes comparative_analysis and statistical_tests rows (replacing an earlier compare's),
    comparison.md and PNG charts (loss curves, efficiency, GRIT effective rank).

    Args:
        db_path: the experiment database written by ``fteval fit``.
        output_dir: folder for comparison.md and the charts (created if missing).
        experiments: fit experiment ids to compare (default: every fit run with a loss curve).
        loss_threshold: loss level for "steps to threshold" in nats (default: the highest
            smoothed final loss among the runs, which every run reaches).

    Returns:
        0 on success.
    """
    if loss_threshold is not None and not math.isfinite(float(loss_threshold)):
        raise ValueError(f"--loss_threshold must be a finite number of nats, got {loss_threshold!r}.")
    db = open_database(Path(db_path))
    try:
        runs = load_runs(db, experiments)
        threshold = float(loss_threshold) if loss_threshold is not None else common_threshold(runs)
        for run in runs:
            run.steps_to_threshold = steps_to_threshold(*run.loss, threshold)
        tests = training_tests(runs)
        curves = run_alignment(db, runs)
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        if charts.matplotlib_available():
            written.append(str(charts.loss_curves_png(runs, output_dir / "loss_curves.png", threshold)))
            written.append(str(charts.efficiency_png(runs, output_dir / "efficiency.png")))
            rank_png = charts.effective_rank_png(runs, output_dir / "effective_rank.png")
            if rank_png is not None:
                written.append(str(rank_png))
            align_png = charts.alignment_png(curves, {r.label: r.method for r in runs},
                                             output_dir / "alignment_over_training.png")
            if align_png is not None:
                written.append(str(align_png))
        choices = [choice for _, choice in curves.values() if choice is not None]
        n_rows = _replace_rows(db, runs, threshold, tests, choices)
        text = comparison_markdown(runs, threshold, tests, written, Path(db_path), curves)
        md = output_dir / "comparison.md"
        write_text_atomic(md, text)
    finally:
        db.close()
    print(text)
    print(f"[fteval] {len(runs)} runs compared, {len(tests)} tests, {n_rows} rows written to {db_path}; "
          f"{md} and {len(written)} chart(s) in {output_dir}")
    return 0
