"""``fteval bench stats``: measured coverage of ``fteval test``'s intervals, and a sample-size planner.

Calibration (default): the Monte Carlo of :mod:`fteval.eval.calibration` over every
distribution x prompts per class x hidden size, then the exact behaviour rows (Wilson interval,
McNemar size). Prints one table (rate with its Wilson 95% interval) and a verdict line per
criterion. The full default grid (3 x 2 x 2 settings, 500 replications) took 2379 s of simulation
on one thread of the shared 2-core development machine (docs/statistics.md); the settings with
500 prompts per class at hidden size 4096 take three quarters of it. Settings are independent
(setting i uses seed + i), so ``--distributions`` runs split over processes reproduce the table.

Planning (``--plan RESULTS``): reads an ``aqi_results.json`` of ``fteval test`` and prints, for
every compared pair, the prompts per class needed to detect each bounded-AQI change in
``deltas`` and each refusal-rate change in ``refusal_deltas`` at 80% power (alpha 0.05), see
:mod:`fteval.eval.power`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from fteval.bench.common import format_table
from fteval.io import write_json_atomic

__all__ = ["bench_stats"]

COVERAGE_TARGET, REJECTION_TARGET = 0.93, 0.05


def _calibrate(reps: int, seed: int, distributions: list[str], n_per_class: list[int], dims: list[int],
               confidence: float) -> tuple[list[dict], list[str]]:
    from tqdm import tqdm

    from fteval.eval.calibration import binary_rows, default_settings, run_setting, setting_rows

    settings = default_settings(distributions, n_per_class, dims)
    rows: list[dict] = []
    verdicts: list[str] = []
    with tqdm(total=reps * len(settings), desc="bench stats", unit="rep") as bar:
        for i, setting in enumerate(settings):
            bar.set_postfix_str(setting.label)
            res = run_setting(setting, reps, seed=seed + i, confidence=confidence, progress=lambda: bar.update(1))
            these = setting_rows(setting, res)
            for r in these:
                r["seconds"] = res["seconds"]
                r["kurtosis"] = res["kurtosis"]
            rows += these
            if setting.distribution == "gaussian":
                for r in these:
                    if r["rate"] is None:
                        continue
                    if r["kind"] == "coverage" and r["rate"] < COVERAGE_TARGET:
                        verdicts.append(f"FAIL {setting.label}: {r['quantity']} coverage {r['rate']:.3f} < {COVERAGE_TARGET}")
                    if r["kind"] == "rejection" and r["low"] > REJECTION_TARGET:
                        verdicts.append(f"FAIL {setting.label}: {r['quantity']} {r['rate']:.3f}, Wilson low {r['low']:.3f} > 0.05")
    rows += binary_rows(confidence=confidence)
    return rows, verdicts


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
    distributions: list[str] = ["gaussian", "t3", "outlier"],  # noqa: B006 - jsonargparse reads the default
    n_per_class: list[int] = [100, 500],  # noqa: B006
    dims: list[int] = [576, 4096],  # noqa: B006
    confidence: float = 0.95,
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
        distributions: embedding families: gaussian, t3 (multivariate t, 3 df), outlier (5% outlier cluster).
        n_per_class: prompts per class.
        dims: hidden sizes.
        confidence: interval level.
        output: also write the rows as JSON here.
        plan: an aqi_results.json of fteval test: print the prompts needed instead of simulating.
        deltas: bounded-AQI changes to plan for.
        refusal_deltas: refusal-rate changes to plan for.
        discordance: planning assumption: share of prompts on which the two models' refusal labels differ.

    Returns 0, or 1 when a Gaussian setting misses coverage >= 0.93 or its null rejection exceeds
    0.05 beyond its binomial error.
    """
    if plan is not None:
        print(_plan(plan, deltas, refusal_deltas, discordance))
        return 0
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}.")
    rows, verdicts = _calibrate(reps, seed, distributions, n_per_class, dims, confidence)
    cols = [("setting", "setting", ""), ("quantity", "quantity", ""), ("rate", "rate", ".3f"),
            ("low", "Wilson low", ".3f"), ("high", "Wilson high", ".3f"), ("n", "reps", "d")]
    print(format_table(rows, cols))
    total = sum({r["setting"]: r.get("seconds", 0.0) for r in rows}.values())
    print(f"\n{reps} replications per setting, seed {seed}, {total:.0f} s of simulation.")
    print("\n".join(verdicts) if verdicts else
          f"PASS: every Gaussian interval covers >= {COVERAGE_TARGET} and no null rejection rate exceeds 0.05 "
          "beyond its binomial error.")
    if output:
        write_json_atomic(Path(output), {"reps": reps, "seed": seed, "rows": rows})
    return 1 if verdicts else 0
