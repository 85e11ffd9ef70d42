"""``fteval bench stats``: measured coverage of ``fteval test``'s intervals, and a sample-size planner.

Calibration (default): the Monte Carlo of :mod:`fteval.eval.calibration` (every replication
through ``fteval test``'s own :func:`fteval.eval.results.summarise`) over every distribution x
prompts per class x hidden size, then the exact behaviour rows (Wilson interval, McNemar size).
Prints one table (rate with its Wilson 95% interval) and a verdict line per failed criterion
(:func:`setting_verdicts`). Cost per replication grows with N^2 D (Gram matrices, pairwise
distances of three models); docs/statistics.md has the measured times. ``--workers`` runs chunks
of replications in parallel processes (docs/statistics.md).

Planning (``--plan RESULTS``): reads an ``aqi_results.json`` of ``fteval test`` and prints, for
every compared pair, the prompts per class needed to detect each bounded-AQI change in
``deltas`` and each refusal-rate change in ``refusal_deltas`` at 80% power (alpha 0.05), see
:mod:`fteval.eval.power`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from fteval.bench.common import format_table
from fteval.io import write_json_atomic

__all__ = ["bench_stats"]

COVERAGE_TARGET, REJECTION_TARGET = 0.93, 0.05
HEAVY_COVERAGE, WARNED_TARGET = 0.90, 0.80  # heavy-tailed families: coverage, or the share of misses warned
OVER_COVERAGE = 0.99  # an interval whose coverage is above this beyond its binomial error is too wide


def setting_verdicts(setting, rows: list[dict]) -> list[str]:
    """FAIL lines of one setting (empty: it passes).

    Every family: no printed point outside its interval; no coverage above :data:`OVER_COVERAGE`
    beyond its Wilson interval. Gaussian: every interval covers >= 0.93 and no null rejection rate
    (each test, and the family-wise error after Holm) lies above 0.05 beyond its Wilson interval.
    Heavy-tailed families (t3, outlier, subcluster), where the summary's warning is the safeguard:
    every interval covers >= 0.90 or the warning marks >= 80% of the missed intervals, and every
    null rejection rate is within 0.05's binomial error or the warning marks >= 80% of the false
    rejections (a false rejection is a Delta interval that misses 0).
    """
    out = []
    by_q = {r["quantity"]: r for r in rows}
    for r in rows:
        if r["rate"] is None:
            continue
        if r["kind"] == "rejection" and r["low"] > REJECTION_TARGET:
            warned = by_q.get("false rejections warned", {}).get("rate")
            if setting.distribution == "gaussian" or warned is None or warned < WARNED_TARGET:
                out.append(f"FAIL {setting.label}: {r['quantity']} {r['rate']:.3f}, Wilson low {r['low']:.3f} > 0.05"
                           + ("" if setting.distribution == "gaussian" else
                              f", and the warning marks only {warned or 0:.2f} of the false rejections"))
        if r["kind"] == "count" and r["rate"] > 0:
            out.append(f"FAIL {setting.label}: {int(r['rate'])} {r['quantity']}")
        if r["kind"] != "coverage":
            continue
        if r["low"] > OVER_COVERAGE:
            out.append(f"FAIL {setting.label}: {r['quantity']} over-covers ({r['rate']:.3f}, Wilson low "
                       f"{r['low']:.3f} > {OVER_COVERAGE}): wider than stated")
        if setting.distribution == "gaussian":
            if r["rate"] < COVERAGE_TARGET:
                out.append(f"FAIL {setting.label}: {r['quantity']} coverage {r['rate']:.3f} < {COVERAGE_TARGET}")
        elif r["rate"] < HEAVY_COVERAGE:
            warned = by_q["missed CIs warned (Delta)" if "Delta" in r["quantity"] else "missed CIs warned (single)"]
            if warned["rate"] is not None and warned["rate"] < WARNED_TARGET:
                out.append(f"FAIL {setting.label}: {r['quantity']} coverage {r['rate']:.3f} < {HEAVY_COVERAGE} and "
                           f"the warning marks only {warned['rate']:.2f} of the missed intervals (< {WARNED_TARGET})")
    return out


CHUNK_REPS = 25  # replications per task when --workers > 1


def _run_chunk(args: tuple) -> tuple[int, dict]:
    """One task of a parallel run: ``reps`` replications of setting ``i`` with its own seed, one thread."""
    import torch

    from fteval.eval.calibration import run_setting

    key, setting, reps, seed, confidence, method = args
    torch.set_num_threads(1)
    return key, run_setting(setting, reps, seed=seed, confidence=confidence, method=method)


def _tasks(settings: list, reps: int, seed: int, confidence: float, workers: int,
           methods: tuple[str, ...] = ("jackknife",)) -> list[tuple]:
    """(key, setting, reps, seed, confidence, method) per task; one per setting and method without workers.

    ``key`` = setting index x number of methods + method index. With workers, every setting's
    replications are split into chunks of :data:`CHUNK_REPS`, chunk c seeded
    ``seed + i + 1000 (c + 1)``, the largest settings first (they set the wall time). Every method
    sees the same seeds, so the methods are compared on the same simulated runs.
    """
    tasks = []
    for i, s in enumerate(settings):
        for j, method in enumerate(methods):
            key = i * len(methods) + j
            if workers <= 1:
                tasks.append((key, s, reps, seed + i, confidence, method))
                continue
            for c, start in enumerate(range(0, reps, CHUNK_REPS)):
                tasks.append((key, s, min(CHUNK_REPS, reps - start), seed + i + 1000 * (c + 1), confidence, method))
    return tasks if workers <= 1 else sorted(tasks, key=lambda t: -t[1].n_per_class ** 2 * t[1].dim)


def _calibrate(reps: int, seed: int, distributions: list[str], n_per_class: list[int], dims: list[int],
               confidence: float, workers: int = 1,
               methods: tuple[str, ...] = ("jackknife",)) -> tuple[list[dict], list[str], list[str]]:
    """Rows, the default method's FAIL lines, and the other methods' (reported, not judged)."""
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from fteval.eval.calibration import binary_rows, default_settings, merge_runs, run_setting, setting_rows

    settings = default_settings(distributions, n_per_class, dims)
    runs: dict[int, list[dict]] = {k: [] for k in range(len(settings) * len(methods))}
    tasks = _tasks(settings, reps, seed, confidence, workers, methods)
    with tqdm(total=reps * len(settings) * len(methods), desc="bench stats", unit="rep") as bar:
        if workers <= 1:
            for key, setting, n_reps, task_seed, conf, method in tasks:
                bar.set_postfix_str(f"{setting.label} {method}")
                runs[key].append(run_setting(setting, n_reps, seed=task_seed, confidence=conf, method=method,
                                             progress=lambda: bar.update(1)))
        else:
            import multiprocessing

            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for key, res in pool.map(_run_chunk, tasks):
                    runs[key].append(res)
                    bar.update(res["reps"])
    rows: list[dict] = []
    verdicts: list[str] = []
    others: list[str] = []
    for i, setting in enumerate(settings):
        for j, method in enumerate(methods):
            res = merge_runs(runs[i * len(methods) + j])
            these = setting_rows(setting, res, method)
            for r in these:
                r["seconds"] = res["seconds"]
                r["kurtosis"] = float(np.nanmedian(res["kurtosis"])) if method == "jackknife" else None
            rows += these
            if method == "jackknife":
                verdicts += setting_verdicts(setting, these)
            else:
                others += [f"{method}: {v[5:]}" for v in setting_verdicts(setting, these)]
    rows += [{**r, "method": "exact"} for r in binary_rows(confidence=confidence)]
    return rows, verdicts, others


def _plan(results: str, deltas: list[float], refusal_deltas: list[float], discordance: float) -> str:
    from fteval.eval.power import mde_wald, prompts_for_delta, prompts_for_refusal_change

    path = Path(results)
    if not path.is_file():
        raise FileNotFoundError(f"--plan {results}: no such file; pass the aqi_results.json that fteval test wrote.")
    res = json.loads(path.read_text())
    comparisons = res.get("comparisons")
    if not comparisons:
        raise ValueError(f"{results} holds no comparisons (an older or single-model run); rerun fteval test with adapters.")
    rows = []
    for key, comp in comparisons.items():
        b = comp.get("aqi_bounded") or {}
        if b.get("se") is None:
            continue
        n = int(comp["n_per_class"])
        row = {"pair": key, "n": n, "mde": mde_wald(b["se"])}
        for d in deltas:
            row[f"d{d}"] = prompts_for_delta(b["se"], n, d)
        rows.append(row)
    cols = [("pair", "pair", ""), ("n", "prompts/class now", "d"), ("mde", "detectable Delta now", ".4f")]
    cols += [(f"d{d}", f"n/class for {d:g}", "d") for d in deltas]
    out = ["Delta AQI (bounded): prompts per class for 80% power at alpha 0.05 (SE scaled as 1/sqrt(n))",
           format_table(rows, cols), "",
           f"Refusal or over-refusal rate change (exact McNemar, discordant share {discordance:g}): prompts needed"]
    ref_rows = [{"delta": d, "n": prompts_for_refusal_change(d, discordance)} for d in refusal_deltas]
    out.append(format_table(ref_rows, [("delta", "rate change", ".3g"), ("n", "prompts of that category", "d")]))
    return "\n".join(out)


def bench_stats(
    reps: int = 500,
    seed: int = 0,
    distributions: list[str] = ["gaussian", "t3", "outlier", "subcluster"],  # noqa: B006 - jsonargparse reads the default
    n_per_class: list[int] = [100, 500],  # noqa: B006
    dims: list[int] = [576, 4096],  # noqa: B006
    confidence: float = 0.95,
    workers: int = 1,
    methods: list[str] = ["jackknife"],  # noqa: B006
    output: Optional[str] = None,
    plan: Optional[str] = None,
    deltas: list[float] = [0.005, 0.01, 0.02, 0.05],  # noqa: B006
    refusal_deltas: list[float] = [0.05, 0.1, 0.2, 0.3],  # noqa: B006
    discordance: float = 0.2,
) -> int:
    """Coverage and null rejection of fteval test's intervals by simulation (or, with --plan, prompts needed).

    Args:
        reps: Monte Carlo replications per setting.
        seed: base seed (setting i uses seed + i).
        distributions: embedding families: gaussian, t3 (multivariate t, 3 df), outlier (5% outlier
            cluster), subcluster (3% of prompts carrying half the within-class variance).
        n_per_class: prompts per class.
        dims: hidden sizes.
        confidence: interval level.
        workers: processes (one thread each); above 1, every setting's replications are split into
            chunks of 25 with their own seeds, so the table differs from a one-process run's by
            Monte Carlo error only.
        methods: the summary's statistics to calibrate: 'jackknife' (the default, judged by the verdict)
            and/or 'bootstrap' (the spec's percentile bootstrap and paired t-tests, reported beside it
            on the same simulated runs).
        output: also write the rows as JSON here.
        plan: an aqi_results.json of fteval test: print the prompts needed instead of simulating.
        deltas: bounded-AQI changes to plan for.
        refusal_deltas: refusal-rate changes to plan for.
        discordance: planning assumption: share of prompts on which the two models' refusal labels differ.

    Returns 0, or 1 when a setting fails a criterion of :func:`setting_verdicts` (null rejection,
    family-wise error, points outside their interval, over-coverage, Gaussian coverage, heavy-tail
    coverage or warning).
    """
    if plan is not None:
        print(_plan(plan, deltas, refusal_deltas, discordance))
        return 0
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}.")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}; use the number of CPU cores.")
    unknown = [m for m in methods if m not in ("jackknife", "bootstrap")]
    if unknown or not methods:
        raise ValueError(f"--methods {methods}: choose from [jackknife, bootstrap].")
    rows, verdicts, others = _calibrate(reps, seed, distributions, n_per_class, dims, confidence, workers,
                                        tuple(methods))
    cols = [("setting", "setting", ""), ("method", "method", ""), ("quantity", "quantity", ""), ("rate", "rate", ".3f"),
            ("low", "Wilson low", ".3f"), ("high", "Wilson high", ".3f"), ("n", "reps", "d")]
    print(format_table(rows, cols))
    total = sum({(r["setting"], r["method"]): r.get("seconds", 0.0) for r in rows}.values())
    print(f"\n{reps} replications per setting, seed {seed}, {total:.0f} s of simulation.")
    print("\n".join(verdicts) if verdicts else
          f"PASS: no printed point lies outside its interval; with Gaussian embeddings no test rejects a true null "
          f"above 0.05 beyond its binomial error (Holm's family-wise error included) and every interval covers >= "
          f"{COVERAGE_TARGET}; in heavy-tailed settings every interval covers >= {HEAVY_COVERAGE} and every test "
          f"keeps its level, or the warning marks >= {WARNED_TARGET:.0%} of the misses.")
    if others:
        print("The spec's procedures on the same runs (reported, not judged; docs/statistics.md):\n" + "\n".join(others))
    if output:
        write_json_atomic(Path(output), {"reps": reps, "seed": seed, "rows": rows})
    return 1 if verdicts else 0
