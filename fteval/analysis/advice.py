"""The recommendation matrix of ``fteval report``: one choice per use case, each with the evidence behind it.

Besides the use cases, every pair of adapters of the latest ``fteval test`` run gets a head-to-head
row ("GRIT vs QLoRA") from that run's paired tests: the bounded-AQI Delta (paired jackknife), the
refusal and over-refusal rates (exact McNemar) and G-Eval (paired t), each corrected in its family.

Every recommendation names the measured numbers it rests on (``evidence``: text plus the
database table and row ids, so a reader can look them up in the export) and a confidence in
[0, 1] from a fixed rule, not a judgement:

* 0.8 when the choice rests on a difference that is significant after the multiple-comparison
  correction (p_adjusted < 0.05, and for AQI a paired CI that excludes 0);
* 0.4 when the numbers were measured but no test of the difference exists;
* 0.2 when a test exists and the difference is not significant;
* 0.2 less (floor 0.1) when the numbers rest on small samples (fewer than 100 prompts per
  class, or one run per method);
* 0.0 with the recommendation "not measured" when the database has no data for the use case.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from fteval.analysis.document import format_number as _f  # short: used inside many f-strings
from fteval.analysis.synthesis import ALPHA, SMALL_SAMPLE, Recommendation, Synthesis, headline
from fteval.methods import display_name

__all__ = ["aqi_test", "recommend", "training_test_rows", "confidence", "format_evidence"]


def confidence(measured: bool, tested: Optional[bool], significant: bool, small: bool) -> float:
    """The module docstring's rule: ``tested`` None = no test exists."""
    if not measured:
        return 0.0
    base = 0.4 if tested is None else (0.8 if significant else 0.2)
    return round(max(0.1, base - (0.2 if small else 0.0)), 2)


def training_test_rows(s: Synthesis) -> list[dict[str, Any]]:
    """The training tests as ``statistical_tests``-shaped dicts (stored rows, or the ones computed in memory)."""
    if s.training_tests_stored:
        return [t for t in s.tests if (t.get("details") or {}).get("analysis") == "training_comparison"]
    return [{"id": None, "test": t.test, "metric": t.metric, "group_a": t.group_a, "group_b": t.group_b,
             "statistic": t.statistic, "p_value": t.p_value, "p_adjusted": t.p_adjusted,
             "correction": t.details.get("correction"), "effect_size": t.effect_size,
             "effect_size_name": t.effect_size_name, "n": t.n, "details": {**t.details, "mean_a": t.mean_a,
                                                                             "mean_b": t.mean_b}} for t in s.training_tests]


def _ev(text: str, *refs: tuple[str, Optional[int]]) -> dict[str, Any]:
    """An evidence item: its text and the database rows it cites, ``[{"table": ..., "id": ...}]``."""
    return {"text": text, "refs": [{"table": t, "id": int(i)} for t, i in refs if i is not None]}


def format_evidence(item: dict[str, Any]) -> str:
    """``text [table #id, table #id]`` for the report tables."""
    refs = ", ".join(f"{r['table']} #{r['id']}" for r in item.get("refs") or [])
    return item["text"] + (f" [{refs}]" if refs else "")


def _one_run_per_method(s: Synthesis) -> bool:
    methods = [r.method for r in s.runs]
    return any(methods.count(m) < 2 for m in set(methods))


def _find_test(rows: list[dict[str, Any]], metric: str, a: str, b: str, window: Optional[str] = None) -> Optional[dict]:
    for t in rows:
        groups = {t["group_a"], t["group_b"]}
        if t["metric"] == metric and groups == {a, b} and (window is None or (t.get("details") or {}).get("window") == window):
            return t
    return None


def _pairwise_evidence(rows, metric, best, others, window=None) -> tuple[list[dict], Optional[bool], bool]:
    evidence, tested, significant = [], None, True
    for other in others:
        t = _find_test(rows, metric, best, other, window)
        if t is None:
            significant = False
            continue
        tested = True
        sig = t["p_adjusted"] is not None and t["p_adjusted"] < ALPHA
        significant = significant and sig
        evidence.append(_ev(f"{t['test']} on {metric} {t['group_a']} vs {t['group_b']}: p={_f(t['p_value'], 3)}, "
                            f"p_adjusted={_f(t['p_adjusted'], 3)} ({t.get('correction')})", ("statistical_tests", t["id"])))
    return evidence, tested, bool(tested) and significant


def _latest_per_method(s: Synthesis) -> list:
    latest: dict[str, Any] = {}
    for run in s.runs:  # oldest first: the last one of a method wins
        latest[run.method] = run
    return list(latest.values())


def _choose(use_case: str, cands: list, value, describe, evidence: list[dict], rows: list[dict], test_metric: Optional[str],
            small: bool, window: Optional[str] = None) -> Recommendation:
    """Pick the lowest ``value(run)``; ties are reported as ties; the pairwise tests decide the confidence."""
    best = min(cands, key=value)
    tied = [r for r in cands if r is not best and math.isclose(value(r), value(best), rel_tol=1e-9, abs_tol=1e-12)]
    tested, significant = None, False
    if test_metric and len(cands) > 1:
        tev, tested, significant = _pairwise_evidence(rows, test_metric, best.label,
                                                      [r.label for r in cands if r is not best], window)
        evidence = evidence + tev
    if tied:
        text = f"no difference: {', '.join(r.label for r in [best] + tied)} tie at {describe(best)}"
        return Recommendation(use_case, text, confidence(True, tested, False, small), evidence)
    text = f"{best.method} ({best.label}): {describe(best)}"
    if len(cands) == 1:
        text += " (the only method measured)"
    return Recommendation(use_case, text, confidence(True, tested, significant, small), evidence)


def _training_choice(s: Synthesis, use_case: str, attr: str, unit: str, test_metric: Optional[str],
                     window: Optional[str] = None) -> Recommendation:
    cands = [r for r in _latest_per_method(s) if getattr(r, attr) is not None and math.isfinite(float(getattr(r, attr)))]
    if not cands:
        return Recommendation(use_case, f"not measured: no training run recorded {attr}", 0.0, [])
    evidence = [_ev(f"{r.label}: {attr} = {_f(float(getattr(r, attr)))} {unit}", ("experiments", r.id)) for r in cands]
    return _choose(use_case, cands, lambda r: float(getattr(r, attr)), lambda r: f"{attr} {_f(float(getattr(r, attr)))} {unit}",
                   evidence, training_test_rows(s), test_metric, _one_run_per_method(s), window)


def _training_cost(s: Synthesis) -> Recommendation:
    use_case = "Lowest training cost (budget)"
    lines = {c.subject: c for c in s.costs if c.item == "training" and c.cost is not None}
    cands = [r for r in _latest_per_method(s) if r.label in lines]
    if not cands:
        return Recommendation(use_case, "not measured: no training run recorded its duration", 0.0, [])
    evidence = [_ev(f"{r.label}: {_f(lines[r.label].hours, 3)} {lines[r.label].hours_kind} hours x "
                    f"{lines[r.label].price_per_hour:g} = {_f(lines[r.label].cost, 3)} ({r.n_steps} steps, "
                    f"{_f(r.step_time_s)} s/step)", ("experiments", r.id)) for r in cands]
    return _choose(use_case, cands, lambda r: lines[r.label].cost,
                   lambda r: f"training cost {_f(lines[r.label].cost, 3)} ({_f(lines[r.label].hours, 3)} "
                             f"{lines[r.label].hours_kind} hours)",
                   evidence, training_test_rows(s), "step_time_s", _one_run_per_method(s))


def _alignment(s: Synthesis) -> Recommendation:
    use_case = "Strongest safe/unsafe separation (alignment, AQI)"
    ev = s.evaluation
    if ev is None or not ev.scores:
        return Recommendation(use_case, "not measured: run python -m fteval test --config configs/aqi.yaml", 0.0, [])
    small = ev.n_prompts is not None and ev.n_prompts < 2 * SMALL_SAMPLE
    evidence = []
    for model, m in ev.scores.items():
        r = headline(m, "aqi_bounded")
        if r is not None:
            kind = "bias-corrected " if "aqi_bounded_bc" in m else ""
            evidence.append(_ev(f"{model}: AQI (bounded, {kind}95% CI) {_f(r['value'])} [{_f(r['ci_low'])}, "
                                f"{_f(r['ci_high'])}]", ("aqi_scores", r["id"])))
    better = []
    for model, d in ev.deltas.items():
        row = d.get("aqi_bounded") or d.get("aqi")
        test = aqi_test(s, model, "baseline")
        if row is None:
            continue
        ci_pos = row["ci_low"] is not None and row["ci_low"] > 0
        sig = test is not None and test["p_adjusted"] is not None and test["p_adjusted"] < ALPHA
        text = f"Delta-AQI (bounded) {model} - baseline: {_f(row['value'])} [{_f(row['ci_low'])}, {_f(row['ci_high'])}]"
        if test is not None:
            text += f"; {test['test']} on {test['metric']} p_adjusted={_f(test['p_adjusted'], 3)} ({test['correction']})"
        evidence.append(_ev(text, ("aqi_scores", row["id"]), ("statistical_tests", test["id"] if test else None)))
        if ci_pos and sig:
            better.append((row["value"], model))
    if better:
        delta, model = max(better)
        text = (f"{model}: separates safe from unsafe prompts better than the baseline "
                f"(Delta-AQI bounded {_f(delta)}, significant after correction)")
        if len(better) > 1:
            text += "; also significant: " + ", ".join(m for _, m in sorted(better, reverse=True)[1:])
        return Recommendation(use_case, text, confidence(True, True, True, small), evidence)
    ranked = sorted(((headline(m, "aqi_bounded")["value"], name) for name, m in ev.scores.items()
                     if headline(m, "aqi_bounded") is not None), reverse=True)
    top = ranked[0][1] if ranked else "baseline"
    return Recommendation(use_case, f"no adapter separates safe/unsafe prompts measurably better than the baseline "
                          f"(no Delta-AQI CI above 0 with p_adjusted < {ALPHA}); highest point estimate: {top}. "
                          "Choose on cost.", confidence(True, bool(ev.deltas) or None, False, small), evidence)


def _geval(s: Synthesis) -> Recommendation:
    use_case = "Answer quality (G-Eval)"
    rows = [r for r in s.behavioral if r["metric"].startswith("geval")]
    if not rows:
        return Recommendation(use_case, "not measured: no geval_* rows in behavioral_metrics (run the behavioural "
                              "evaluation of fteval test with a judge)", 0.0, [])
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["category"] in (None, "all"):
            by_model.setdefault(r["model"], []).append(r)
    if not by_model:  # only per-category rows: average them
        for r in rows:
            by_model.setdefault(r["model"], []).append(r)
    score = {m: sum(r["value"] for r in rs) / len(rs) for m, rs in by_model.items()}
    best = max(score, key=score.get)
    evidence = [_ev(f"{m}: " + ", ".join(f"{r['metric']}={_f(r['value'])}" for r in rs) + f" (n={rs[0]['n_samples']})",
                    *[("behavioral_metrics", r["id"]) for r in rs]) for m, rs in by_model.items()]
    small = any((r["n_samples"] or 0) < SMALL_SAMPLE for r in rows)
    return Recommendation(use_case, f"{best}: highest mean G-Eval score ({_f(score[best])})",
                          confidence(True, None, False, small), evidence)


def _refusals(s: Synthesis) -> Recommendation:
    use_case = "Refuse unsafe requests without over-refusing safe ones"
    refusal = [r for r in s.behavioral if r["metric"] == "refusal_rate"]
    over = [r for r in s.behavioral if r["metric"] == "over_refusal_rate"]
    if not refusal:
        return Recommendation(use_case, "not measured: no refusal_rate in behavioral_metrics (run the behavioural "
                              "evaluation of fteval test)", 0.0, [])

    def pick(rows, model, prefer):
        mine = [r for r in rows if r["model"] == model]
        return next((r for r in mine if r["category"] == prefer), next((r for r in mine if r["category"] in (None, "all")),
                                                                        mine[0] if mine else None))

    evidence, score = [], {}
    for model in sorted({r["model"] for r in refusal}):
        ref, ovr = pick(refusal, model, "unsafe"), pick(over, model, "safe")
        score[model] = ref["value"] - (ovr["value"] if ovr else 0.0)
        evidence.append(_ev(f"{model}: refusal rate {_f(ref['value'])} on {ref['category']} prompts (n={ref['n_samples']})"
                            + (f", over-refusal {_f(ovr['value'])} (n={ovr['n_samples']})" if ovr else ", over-refusal not measured"),
                            ("behavioral_metrics", ref["id"]), ("behavioral_metrics", ovr["id"] if ovr else None)))
    best = max(score, key=score.get)
    small = any((r["n_samples"] or 0) < SMALL_SAMPLE for r in refusal + over)
    return Recommendation(use_case, f"{best}: highest refusal rate minus over-refusal rate ({_f(score[best])})",
                          confidence(True, None, False, small), evidence)


def _inference(s: Synthesis) -> Recommendation:
    use_case = "Serving speed (inference)"
    rows = [b for b in s.benchmarks if b["metric"] == "tokens_per_s" and b["value"] is not None]
    sizes = [_ev(f"{r.label}: adapter {r.adapter_size_bytes / 2**20:.2f} MiB", ("model_artifacts", r.adapter_artifact_id))
             for r in s.runs if r.adapter_size_bytes]
    if not rows:
        return Recommendation(use_case, "not measured: no tokens_per_s in inference_benchmarks (run python -m fteval "
                              "bench)", 0.0, sizes)
    best = max(rows, key=lambda b: b["value"])
    evidence = [_ev(f"{b['backend']} / {b['model']}: {_f(b['value'])} tokens/s", ("inference_benchmarks", b["id"]))
                for b in rows] + sizes
    return Recommendation(use_case, f"{best['model']} on {best['backend']}: {_f(best['value'])} tokens/s",
                          confidence(True, None, False, False), evidence)


def _value(s: Synthesis) -> Recommendation:
    use_case = "Best alignment per unit cost (cost-quality Pareto frontier)"
    if not s.pareto:
        return Recommendation(use_case, "not measured: needs AQI scores and measured training hours", 0.0, [])
    frontier = [p for p in s.pareto if p.on_frontier]
    evidence = [_ev(f"{p.name}: training cost {_f(p.cost, 3)}, AQI (bounded) {_f(p.quality)}"
                    f"{' (on the frontier)' if p.on_frontier else ' (dominated)'}", ("aqi_scores", p.row_id),
                    ("experiments", p.experiment_id)) for p in s.pareto]
    tuned = [p for p in frontier if p.name != "baseline"]
    small = s.evaluation is not None and s.evaluation.n_prompts is not None and s.evaluation.n_prompts < 2 * SMALL_SAMPLE
    if not tuned:
        return Recommendation(use_case, "baseline: no adapter adds AQI for its training cost (the baseline dominates)",
                              confidence(True, None, False, small), evidence)
    best = max(tuned, key=lambda p: p.quality)
    names = ", ".join(p.name for p in frontier)
    return Recommendation(use_case, f"{best.name}: highest AQI on the frontier ({names})",
                          confidence(True, None, False, small), evidence)


def aqi_test(s: Synthesis, a: str, b: str) -> Optional[dict[str, Any]]:
    """The latest test run's test of the bounded-AQI Delta a - b (paired jackknife; older runs: paired bootstrap on AQI)."""
    if s.evaluation is None:
        return None
    eid = s.evaluation.experiment["id"]
    mine = [t for t in s.tests if t["experiment_id"] == eid and t["group_a"] == a and t["group_b"] == b]
    return next((t for t in mine if t["test"] == "paired_jackknife" and t["metric"] == "aqi_bounded"),
                next((t for t in mine if t["test"] == "paired_bootstrap" and t["metric"] == "aqi"), None))


def _head_to_head(s: Synthesis) -> list[Recommendation]:
    """One recommendation per pair of adapters of the latest test run ("GRIT vs QLoRA"), from its paired tests."""
    ev = s.evaluation
    if ev is None:
        return []
    eid = ev.experiment["id"]
    pairs = []
    for t in s.tests:
        key = (t["group_a"], t["group_b"])
        if t["experiment_id"] == eid and "baseline" not in key and None not in key and key not in pairs:
            pairs.append(key)
    small = ev.n_prompts is not None and ev.n_prompts < 2 * SMALL_SAMPLE
    out = []
    for a, b in pairs:
        mine = [t for t in s.tests if t["experiment_id"] == eid and (t["group_a"], t["group_b"]) == (a, b)]
        evidence, wins = [], []
        for t in mine:
            sig = t["p_adjusted"] is not None and t["p_adjusted"] < ALPHA
            ci = f" [{_f(t['ci_low'])}, {_f(t['ci_high'])}]" if t.get("ci_low") is not None else ""
            if t["test"] == "mcnemar_exact":
                d = t["details"] or {}
                what = (f"{t['metric']}: {_f(100 * d.get('rate_a', float('nan')), 3)}% vs "
                        f"{_f(100 * d.get('rate_b', float('nan')), 3)}% ({d.get('n_a_only')} vs {d.get('n_b_only')} "
                        f"discordant prompts)")
            else:
                what = f"{t['metric']} Delta {_f(t['statistic'])}{ci}" if t["test"] == "paired_jackknife" else \
                    f"{t['metric']} {t['test']} statistic {_f(t['statistic'])}"
            evidence.append(_ev(f"{a} - {b}: {what}, {t['test']} p_adjusted={_f(t['p_adjusted'], 3)}",
                                ("statistical_tests", t["id"])))
            if sig and t["test"] == "paired_jackknife" and t["metric"] == "aqi_bounded":
                wins.append(f"{a if t['statistic'] > 0 else b} separates safe from unsafe prompts better "
                            f"(Delta AQI bounded {_f(t['statistic'])})")
            if sig and t["test"] == "paired_t" and t["metric"].startswith("geval_"):
                mean_diff = (t["details"] or {}).get("mean_diff", t["statistic"])
                wins.append(f"{a if mean_diff > 0 else b} scores higher on G-Eval {t['metric'][6:]} "
                            f"({_f(abs(mean_diff), 3)} points of 5)")
            if sig and t["test"] == "mcnemar_exact":
                more = a if t["statistic"] > 0 else b
                wins.append(f"{more} {'refuses more unsafe' if t['metric'] == 'refusal_rate' else 'over-refuses more safe'}"
                            f" prompts ({_f(100 * abs(t['statistic']), 3)} points)")
        tested = bool(mine) or None
        if wins:
            text = f"{a} vs {b}: " + "; ".join(wins) + " (significant after correction)"
        elif mine:
            text = (f"{a} vs {b}: no difference in bounded AQI, refusal, over-refusal or G-Eval is significant after "
                    "correction on these prompts; the run's power line says how large a difference it could have seen")
        else:
            text = f"{a} vs {b}: not tested"
        out.append(Recommendation(f"Head to head: {display_name(a)} vs {display_name(b)}", text,
                                  confidence(True, tested, bool(wins), small), evidence))
    return out


def recommend(s: Synthesis) -> list[Recommendation]:
    """The recommendation matrix: one :class:`Recommendation` per use case, in a fixed order."""
    out = [_alignment(s), *_head_to_head(s)]
    out.append(_training_cost(s))
    out.append(_training_choice(s, "Best fit to the training data (lowest validation loss)", "final_val_loss", "nats",
                                "val_loss"))
    out.append(_training_choice(s, "Fastest convergence (steps to the common loss threshold)", "steps_to_threshold",
                                "steps", "train_loss", window="all"))
    out.append(_training_choice(s, "Limited memory", "peak_memory_gib", "GiB", None))
    out.append(_refusals(s))
    out.append(_geval(s))
    out.append(_inference(s))
    out.append(_value(s))
    return out
