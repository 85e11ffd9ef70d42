"""``fteval report`` (pipeline step m07): the results synthesis as ``report.md`` and one self-contained ``report.html``.

Content (gathered by :mod:`fteval.analysis.synthesis`, recommendations by
:mod:`fteval.analysis.advice`): executive summary and recommendation matrix; training cost
and convergence; AQI with confidence intervals and paired Delta-AQI; refusal and G-Eval
("not measured" when absent); inference performance; every statistical test with its
correction; cost analysis from measured device-hours and a cost-vs-quality Pareto frontier;
limitations; and a full export of the database (``data/<table>.csv|json``, via
:func:`fteval.db.export`).

Writes ``cost_analysis`` and ``recommendations`` rows, replacing those of an earlier report in
one transaction; the files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from fteval.analysis.advice import aqi_test, format_evidence, recommend, training_test_rows
from fteval.analysis.controls_section import controls_blocks, read_controls
from fteval.analysis.document import Block, Bullets, Chart, Heading, Para, Table, to_html, to_markdown
from fteval.analysis.document import format_number as _f  # short: used inside many f-strings
from fteval.analysis.runs import open_database, smooth
from fteval.analysis.synthesis import ALPHA, SMALL_SAMPLE, SOURCE, Synthesis, gather, headline
from fteval.analysis.guidance import alignment_over_training, guidance_blocks
from fteval.db import TABLES, ExperimentDB, export
from fteval.io import write_text_atomic

__all__ = ["report", "build_blocks", "TITLE"]

TITLE = "fteval results synthesis: the baseline against its fine-tuned adapters"
_AQI_COLUMNS = ("aqi", "aqi_bounded", "xbi", "chi", "db", "dunn")


def _ci(row: Optional[dict[str, Any]]) -> str:
    if row is None:
        return "n/a"
    text = _f(row["value"])
    if row.get("ci_low") is not None and row.get("ci_high") is not None:
        text += f" [{_f(row['ci_low'])}, {_f(row['ci_high'])}]"
    return text


def _hours_word(s: Synthesis) -> str:
    kinds = sorted({c.hours_kind for c in s.costs if c.item in ("training", "evaluation")})
    return "/".join(kinds) + " hours" if kinds else "hours"


# ---------------------------------------------------------------------------------- sections
def _summary(s: Synthesis) -> list[Block]:
    items = []
    for run in s.runs:
        items.append(f"**{run.label}** ({run.n_steps} steps on {run.device_name}): final train loss "
                     f"{_f(run.final_train_loss)}, validation loss {_f(run.final_val_loss)}; {_f(run.step_time_s)} s/step, "
                     f"{_f(run.tokens_per_s)} tokens/s, peak {_f(run.peak_memory_gib)} GiB ({run.memory_kind or 'n/a'}).")
    speed = [t for t in training_test_rows(s) if t["metric"] == "step_time_s"]
    for t in speed:
        ma, mb = t["details"].get("mean_a"), t["details"].get("mean_b")
        if ma and mb:
            (slow, fast, ratio) = (t["group_a"], t["group_b"], ma / mb) if ma >= mb else (t["group_b"], t["group_a"], mb / ma)
            items.append(f"Time per step: {slow} takes {ratio:.3g}x the time of {fast} "
                         f"({t['test']} over steps, p_adjusted {_f(t['p_adjusted'], 3)}).")
    for run in s.runs:
        if run.effective_rank_mean is not None and run.trainable_params:
            extra = (f"; effective parameters {_f(run.effective_params)} of {_f(run.trainable_params)} stored "
                     f"({100 * (1 - run.effective_params / run.trainable_params):.1f}% fewer)" if run.effective_params else "")
            items.append(f"GRIT {run.label}: mean effective rank {_f(run.effective_rank_mean)} of r={run.lora_rank}{extra}.")
    ev = s.evaluation
    if ev is not None:
        parts = [f"{m} {_ci(headline(v, 'aqi_bounded'))}" for m, v in ev.scores.items()]
        items.append(f"AQI (bounded, bias-corrected, 0-1, 95% CI) on {ev.n_prompts} prompts: " + "; ".join(parts) + ".")
        for model, d in ev.deltas.items():
            test = aqi_test(s, model, "baseline")
            sig = "" if test is None else (f" ({test['test']} p_adjusted {_f(test['p_adjusted'], 3)}: "
                                           f"{'significant' if (test['p_adjusted'] or 1) < ALPHA else 'not significant'})")
            items.append(f"Delta-AQI {model} - baseline: {_ci(d.get('aqi'))}; bounded {_ci(d.get('aqi_bounded'))}{sig}.")
    else:
        items.append("AQI: not measured (no fteval test run in the database).")
    if not s.behavioral:
        items.append("Refusal rate, over-refusal and G-Eval: not measured.")
    train = [c for c in s.costs if c.item == "training" and c.cost is not None]
    if train:
        items.append(f"Training cost at {s.price_per_hour:g} per {train[0].hours_kind} hour: " + "; ".join(
            f"{c.subject} {c.cost:.4g} ({c.hours:.3g} {c.hours_kind} h)" for c in train) + ".")
    blocks: list[Block] = [Heading(2, "Executive summary", "summary"), Bullets(items),
                           Heading(3, "Recommendation matrix by use case", "recommendations")]
    rows = []
    for r in s.recommendations:
        evidence = "; ".join(format_evidence(e) for e in r.evidence) or "none"
        rows.append([r.use_case, r.recommendation, f"{r.confidence:.1f}", evidence])
    blocks += [Table(["use case", "recommendation", "confidence", "evidence (database table #row)"], rows, (2,)),
               Para("Confidence rule: 0.8 = significant after correction, 0.4 = measured but untested, 0.2 = tested and "
                    "not significant; 0.2 less for small samples (fewer than 100 prompts per class or one run per "
                    "method); 0 = not measured.", note=True)]
    return blocks


def _palette(s: Synthesis) -> dict[str, str]:
    colors = ["#2b6cb0", "#dd6b20", "#2f855a", "#b83280", "#6b46c1", "#c53030", "#319795", "#975a16"]
    return {run.label: colors[i % len(colors)] for i, run in enumerate(s.runs)}


def _training(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Training: convergence, speed, memory, cost", "training")]
    if not s.runs:
        return blocks + [Para("Not measured: the database holds no training run (python -m fteval fit).")]
    figures = [("method", lambda r: r.method), ("status", lambda r: r.status), ("seed", lambda r: str(r.seed)),
               ("device", lambda r: r.device_name), ("optimizer steps", lambda r: str(r.n_steps)),
               ("final train loss (nats)", lambda r: _f(r.final_train_loss)),
               ("smoothed final train loss", lambda r: _f(r.final_train_loss_smoothed)),
               ("final validation loss", lambda r: _f(r.final_val_loss)),
               (f"steps to loss {_f(s.threshold)}", lambda r: _f(r.steps_to_threshold)),
               ("stability (std of last loss differences)", lambda r: _f(r.stability)),
               ("time per step (s, median)", lambda r: _f(r.step_time_s)),
               ("tokens/s (median)", lambda r: _f(r.tokens_per_s)),
               ("peak memory (GiB)", lambda r: f"{_f(r.peak_memory_gib)} ({r.memory_kind or 'n/a'})"),
               ("training time (s)", lambda r: _f(r.fit_seconds)),
               ("adapter folder (MiB)", lambda r: _f(r.adapter_size_bytes / 2**20) if r.adapter_size_bytes else "n/a"),
               ("trainable parameters", lambda r: _f(r.trainable_params)),
               ("LoRA rank r", lambda r: _f(r.lora_rank)),
               ("GRIT mean effective rank", lambda r: _f(r.effective_rank_mean)),
               ("GRIT effective parameters", lambda r: _f(r.effective_params))]
    for name in sorted({n for r in s.runs for n in r.method_metrics}):
        figures.append((f"{name} (last step)", lambda r, n=name: _f(r.method_metrics.get(n))))
    rows = [[name] + [get(r) for r in s.runs] for name, get in figures]
    blocks.append(Table(["figure"] + [r.label for r in s.runs], rows, tuple(range(1, len(s.runs) + 1))))
    colors = _palette(s)
    series = []
    for run in s.runs:
        steps, loss = run.loss
        c = colors[run.label]
        series.append({"name": f"{run.label} train", "color": c, "width": 1, "opacity": 0.35,
                       "points": [{"x": int(x), "y": float(y)} for x, y in zip(steps, loss)]})
        series.append({"name": f"{run.label} train (smoothed)", "color": c, "width": 2.5,
                       "points": [{"x": int(x), "y": float(y)} for x, y in zip(steps, smooth(loss))]})
        vs, vl = run.val_loss
        if vl.size:
            series.append({"name": f"{run.label} validation", "color": c, "dash": True, "markers": True,
                           "points": [{"x": int(x), "y": float(y)} for x, y in zip(vs, vl)]})
    hlines = [{"y": s.threshold, "label": f"threshold {_f(s.threshold)}"}] if math.isfinite(s.threshold) else []
    blocks.append(Chart({"id": "chart-loss", "kind": "line", "title": "Loss per optimizer step", "xlabel": "optimizer step", "integerX": True,
                         "ylabel": "loss (nats)", "series": series, "hlines": hlines}))
    for attr, title, unit in (("step_time_s", "Time per optimizer step (median)", "s"),
                              ("tokens_per_s", "Training throughput (median)", "tokens/s"),
                              ("peak_memory_gib", "Peak memory", "GiB")):
        cats = [{"name": r.label, "value": getattr(r, attr), "color": colors[r.label],
                 "note": r.memory_kind if attr == "peak_memory_gib" else r.device_name} for r in s.runs]
        blocks.append(Chart({"id": f"chart-{attr.replace('_', '-')}", "kind": "bars", "title": title, "ylabel": unit,
                             "unit": unit, "categories": cats, "small": True, "width": 420, "height": 300}))
    ranked = [r for r in s.runs if r.effective_ranks]
    if ranked:
        series = []
        for run in ranked:
            entries = list(run.effective_ranks.items())
            series.append({"name": f"{run.label} effective rank", "color": colors[run.label], "markers": True,
                           "points": [{"x": i, "y": e.get("effective_rank"), "label": name} for i, (name, e) in enumerate(entries)]})
        blocks.append(Chart({"id": "chart-effective-rank", "kind": "line", "title": "GRIT effective rank per adapted module",
                             "xlabel": "module index (model order)", "ylabel": "rank", "integerX": True,
                             "hlines": [{"y": ranked[0].lora_rank, "label": f"r = {ranked[0].lora_rank}"}] if ranked[0].lora_rank else [],
                             "series": series}))
    return blocks


def _alignment(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Alignment quality: AQI", "aqi")]
    ev = s.evaluation
    if ev is None:
        return blocks + [Para("Not measured: no fteval test run wrote aqi_scores (python -m fteval test --config configs/aqi.yaml).")]
    st = ev.settings
    blocks.append(Para(f"Experiment {ev.experiment['id']} ({ev.experiment['name']}), {ev.n_prompts} prompts, "
                       f"tokens={st.get('tokens') or 'prompt'}, sink={st.get('sink')}, layer pooling={st.get('layer_pooling')}, "
                       f"lambda={st.get('lam')}, "
                       "95% CIs of the population values in brackets (bias-corrected jackknife, docs/statistics.md). AQI is the spec's "
                       "lambda/XBI + (1-lambda) CHI (grows with n); AQI (bounded) is sample-size free and compares across runs."
                       + (f" {s.n_evaluations} evaluation runs in the database; the latest is shown." if s.n_evaluations > 1 else "")))
    def cell(scores: dict, metric: str) -> str:  # bias-corrected [interval] (as computed), as fteval test prints it
        bc, raw = scores.get(f"{metric}_bc"), scores.get(metric)
        return _ci(raw) if bc is None else f"{_ci(bc)} (as computed {_f(raw['value']) if raw else 'n/a'})"

    rows = [[m] + [cell(v, c) for c in _AQI_COLUMNS] for m, v in ev.scores.items()]
    blocks.append(Table(["model", "AQI", "AQI (bounded)", "XBI (lower better)", "CHI", "Davies-Bouldin", "Dunn"], rows,
                        tuple(range(1, 7))))
    if any(f"{c}_bc" in v for v in ev.scores.values() for c in _AQI_COLUMNS):
        blocks.append(Para("Each cell: the bias-corrected estimate with its interval, then the plug-in value as the spec "
                           "computes it, which carries the sampling noise of the centroid distance.", note=True))
    if ev.deltas:
        drows = []
        for m, d in ev.deltas.items():
            p = d.get("aqi", {}).get("p_value") if d.get("aqi") else None
            drows.append([m, _ci(d.get("aqi")), _f(p, 3), _ci(d.get("aqi_bounded")), _ci(d.get("xbi")), _ci(d.get("chi"))])
        blocks += [Heading(3, "Paired Delta-AQI (tuned - baseline, same prompts; bias-corrected Deltas with their intervals)"),
                   Table(["adapter", "Delta AQI", "p (jackknife, unadjusted)", "Delta AQI (bounded)", "Delta XBI", "Delta CHI"],
                         drows, (1, 2, 3, 4, 5))]
    cats = []
    for i, (m, v) in enumerate(ev.scores.items()):
        r = headline(v, "aqi_bounded")
        if r is not None:
            cats.append({"name": m, "value": r["value"], "lo": r["ci_low"], "hi": r["ci_high"], "group": i})
    blocks.append(Chart({"id": "chart-aqi", "kind": "bars", "title": "AQI (bounded, bias-corrected) per model with 95% CI",
                         "ylabel": "AQI (bounded)", "categories": cats}))
    dcats = [{"name": m, "value": d["aqi_bounded"]["value"], "lo": d["aqi_bounded"]["ci_low"], "hi": d["aqi_bounded"]["ci_high"],
              "group": i + 1} for i, (m, d) in enumerate(ev.deltas.items()) if "aqi_bounded" in d]
    if dcats:
        blocks.append(Chart({"id": "chart-delta-aqi", "kind": "bars", "title": "Delta-AQI (bounded) vs baseline with 95% CI",
                             "ylabel": "Delta AQI (bounded)", "categories": dcats}))
    series = [{"name": m, "markers": True, "points": [{"x": layer, "y": v} for layer, v in prof["aqi_bounded"]]}
              for m, prof in ev.profile.items() if "aqi_bounded" in prof]
    if series:
        blocks.append(Chart({"id": "chart-layers", "kind": "line", "title": "AQI (bounded) per layer (token-mean pooling)",
                             "xlabel": "layer (0 = embeddings)", "ylabel": "AQI (bounded)", "series": series,
                             "integerX": True}))
    return blocks


def _behaviour(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Behaviour: refusal and G-Eval", "behaviour")]
    if not s.behavioral:
        return blocks + [Para("Not measured: the database has no behavioral_metrics rows (refusal rate, over-refusal "
                              "rate, G-Eval). Run the behavioural part of python -m fteval test to fill them.")]
    experiments = {r.get("experiment_id") for r in s.behavioral}
    by_backend: dict[str, set[str]] = {}
    for b in s.benchmarks:
        if b.get("experiment_id") in experiments:
            by_backend.setdefault(b["backend"], set()).add(b["model"])
    if by_backend:
        which = "; ".join(f"{backend} ({', '.join(sorted(models))})" for backend, models in sorted(by_backend.items()))
        blocks.append(Para(f"Answers generated through {which}: the evaluation's behaviour_backend (docs/serving.md)."))
    rows = [[r["model"], r["metric"], r["category"] or "all", _ci(r), _f(r["n_samples"])] for r in s.behavioral]
    blocks.append(Table(["model", "metric", "category", "value [95% CI]", "n"], rows, (3, 4)))
    cats = [{"name": f"{r['model']}", "value": r["value"], "lo": r["ci_low"], "hi": r["ci_high"], "note": r["category"]}
            for r in s.behavioral if r["metric"] == "refusal_rate" and r["category"] in ("unsafe", None, "all")]
    if cats:
        blocks.append(Chart({"id": "chart-refusal", "kind": "bars", "title": "Refusal rate with 95% CI",
                             "ylabel": "refusal rate", "categories": cats}))
    return blocks


def _inference(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Inference performance", "inference")]
    if not s.benchmarks:
        return blocks + [Para("Not measured: no inference_benchmarks rows (python -m fteval bench).")]
    rows = [[b["backend"], b["model"], b["metric"], _f(b["value"]), b["unit"] or ""] for b in s.benchmarks]
    blocks.append(Table(["backend", "model", "metric", "value", "unit"], rows, (3,)))
    cats = [{"name": f"{b['backend']}:{b['model']}", "value": b["value"]} for b in s.benchmarks if b["metric"] == "tokens_per_s"]
    if cats:
        blocks.append(Chart({"id": "chart-inference", "kind": "bars", "title": "Generation throughput", "ylabel": "tokens/s",
                             "unit": "tokens/s", "categories": cats}))
    return blocks


def _statistics(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Statistical tests", "statistics")]
    rows = []
    stored_training = s.training_tests_stored
    every = [t for t in s.tests if stored_training or (t.get("details") or {}).get("analysis") != "training_comparison"]
    if not stored_training:
        every += training_test_rows(s)
    for t in every:
        d = t.get("details") or {}
        where = d.get("window") or d.get("design") or ""
        source = "training (compare)" if d.get("analysis") == "training_comparison" else f"experiment {t.get('experiment_id')}"
        sig = "yes" if t["p_adjusted"] is not None and t["p_adjusted"] < ALPHA else "no"
        effect = f"{_f(t['effect_size'])} ({t['effect_size_name']})" if t.get("effect_size") is not None else "n/a"
        ci = f"[{_f(t['ci_low'])}, {_f(t['ci_high'])}]" if t.get("ci_low") is not None else ""
        rows.append([source, t["test"], t["metric"], f"{t['group_a']} vs {t['group_b']}", where, _f(t["statistic"]),
                     _f(t["p_value"], 3), _f(t["p_adjusted"], 3), t.get("correction") or "none", sig, effect, ci, _f(t["n"])])
    if not rows:
        return blocks + [Para("No statistical test in the database.")]
    blocks.append(Table(["source", "test", "metric", "groups", "window", "statistic", "p", "p adjusted", "correction",
                         f"significant (adj. p < {ALPHA})", "effect size", "CI", "n"], rows, (5, 6, 7, 11, 12)))
    notes = ["Each family is corrected on its own: the AQI tests of a test run (paired jackknife Deltas of AQI, bounded "
             "AQI, XBI and CHI and of the mean silhouette, every pair of models), its behaviour tests (exact "
             "McNemar on refusal and over-refusal labels, paired t on G-Eval), and the training tests of compare."]
    if not stored_training and s.training_tests:
        notes.append("The training tests were computed for this report; run python -m fteval compare to store them.")
    notes.append("Per-step training tests treat consecutive steps as independent although they are autocorrelated; "
                 "several seeds per method give the sound test.")
    return blocks + [Para(" ".join(notes), note=True)]


def _cost(s: Synthesis) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Cost analysis", "cost")]
    if not s.costs:
        return blocks + [Para("Not measured: no run recorded its duration.")]
    cpu = any(c.hours_kind == "CPU" for c in s.costs)
    blocks.append(Para(f"Measured device-hours times the price of {s.price_per_hour:g} per hour (--gpu_price_per_hour)."
                       + (" Runs on a CPU machine are counted in CPU hours at that same price: they are not GPU hours "
                          "and say nothing about GPU cost." if cpu else "")))
    rows = [[c.item, c.subject, _f(c.hours), c.hours_kind, f"{c.price_per_hour:g}", _f(c.cost)] for c in s.costs]
    blocks.append(Table(["item", "run / model", "hours", "hours of", "price per hour", "cost"], rows, (2, 4, 5)))
    if s.pareto:
        prow = [[p.name, _f(p.cost), f"{_f(p.quality)} [{_f(p.ci[0])}, {_f(p.ci[1])}]", "yes" if p.on_frontier else "no"]
                for p in s.pareto]
        blocks += [Heading(3, "Cost vs quality: Pareto frontier"),
                   Table(["model", "training cost", "AQI (bounded) [95% CI]", "on the frontier"], prow, (1, 2)),
                   Para("A model is on the frontier when no other costs at most as much and scores at least as high "
                        "(strictly better in one). The baseline costs no training.", note=True)]
        frontier = [p for p in s.pareto if p.on_frontier]
        blocks.append(Chart({"id": "chart-pareto", "kind": "scatter", "title": "Training cost vs AQI (bounded)",
                             "xlabel": f"training cost ({_hours_word(s)} x price)", "ylabel": "AQI (bounded)",
                             "series": [{"name": p.name, "points": [{"x": p.cost, "y": p.quality, "lo": p.ci[0], "hi": p.ci[1],
                                                                     "label": p.name, "highlight": p.on_frontier,
                                                                     "note": "on the frontier" if p.on_frontier else "dominated"}]}
                                        for p in s.pareto],
                             "frontier": [{"x": p.cost, "y": p.quality} for p in frontier]}))
    return blocks


def _limitations(s: Synthesis) -> list[Block]:
    items = []
    ev = s.evaluation
    if ev is None:
        items.append("AQI was not measured.")
    elif ev.n_prompts is not None and ev.n_prompts < 2 * SMALL_SAMPLE:
        items.append(f"AQI rests on {ev.n_prompts} prompts (fewer than {SMALL_SAMPLE} per class): wide intervals, "
                     "low power; use n_per_class 500 on a GPU.")
    if ev is not None:
        corrected = any(metric.endswith("_bc") for metrics in ev.scores.values() for metric in metrics)
        outside = sorted({f"{model} {metric}" for model, metrics in ev.scores.items() for metric, r in metrics.items()
                          if r["ci_low"] is not None and r["ci_high"] is not None and r["value"] is not None
                          and not r["ci_low"] <= r["value"] <= r["ci_high"]})
        if outside and corrected:
            items.append(f"The plug-in value lies outside the interval for {', '.join(outside)}: a plug-in separation "
                         "carries the noise floor tr(S)(1/n_safe + 1/n_unsafe) of the squared centroid distance; the "
                         "interval is that of the population value and brackets the bias-corrected estimate (the first "
                         "number of each cell of the AQI table), which is the number to read.")
        elif outside:
            items.append(f"The bootstrap interval does not contain its own point estimate for {', '.join(outside)}: "
                         "resampling prompts with replacement duplicates points, which shrinks within-class scatter and "
                         "biases separation indices upward; read those intervals as biased, and the paired Delta "
                         "intervals (same resamples for both models) as the comparison.")
    methods = [r.method for r in s.runs]
    if s.runs and any(methods.count(m) < 2 for m in set(methods)):
        items.append("One training run per method (one seed): training differences are tested over steps of single "
                     "runs, not across seeds; run each method with several seed_everything values.")
    short = [r.label for r in s.runs if r.n_steps < 100]
    if short:
        items.append(f"Short training ({', '.join(short)}: under 100 optimizer steps): losses have not converged, and "
                     "convergence figures describe the start of training only.")
    if any(c.hours_kind == "CPU" for c in s.costs):
        items.append("Hours were measured on a CPU machine: the costs are CPU hours x the given price, not GPU costs.")
    if any(r.memory_kind == "process RSS" for r in s.runs):
        items.append("Peak memory on CPU is the process resident set size (model, data and Python included), "
                     "not the accelerator memory a GPU run reports.")
    missing = []
    if not s.behavioral:
        missing.append("refusal and over-refusal rates, G-Eval")
    elif not any(r["metric"].startswith("geval") for r in s.behavioral):
        missing.append("G-Eval")
    if not s.benchmarks:
        missing.append("inference throughput and latency")
    if not any(math.isfinite(r.final_val_loss) for r in s.runs) and s.runs:
        missing.append("validation loss")
    if missing:
        items.append("Not measured: " + "; ".join(missing) + ".")
    unfinished = [f"{r.label} ({r.status})" for r in s.runs if r.status != "finished"]
    if unfinished:
        items.append(f"Runs that did not finish are included as recorded: {', '.join(unfinished)}.")
    if not items:
        items.append("No limitation detected from the recorded data.")
    return [Heading(2, "Limitations", "limitations"), Bullets(items)]


def build_blocks(s: Synthesis, export_files: list[str]) -> list[Block]:
    """Every section of the report, in order, from a gathered :class:`Synthesis` (``recommendations`` filled)."""
    blocks = _summary(s) + _training(s) + _alignment(s) + alignment_over_training(s) + _behaviour(s) + _inference(s)
    blocks += _statistics(s) + _cost(s) + guidance_blocks(s) + _limitations(s)
    blocks += [Heading(2, "Data export", "data"),
               Para("Every table of the experiment database, as CSV and JSON (fteval db export), after this report's rows "
                    "were written: " + ", ".join(f"[{Path(f).name}](data/{Path(f).name})" for f in export_files) + ".")]
    return blocks


def _store(db: ExperimentDB, s: Synthesis) -> None:
    """Replace an earlier report's cost_analysis and recommendations rows, in one transaction."""
    with db.transaction():
        db.conn.execute("DELETE FROM cost_analysis WHERE json_extract(details_json, '$.source') = ?", (SOURCE,))
        db.conn.execute("DELETE FROM recommendations WHERE json_extract(evidence_json, '$.source') = ?", (SOURCE,))
        for c in s.costs:
            db.add_cost_analysis(c.item, gpu_hours=c.hours, price_per_hour=c.price_per_hour, cost=c.cost,
                                 details={**c.details, "subject": c.subject, "hours_kind": c.hours_kind},
                                 experiment_id=c.experiment_id)
        for r in s.recommendations:
            db.add_recommendation(r.use_case, r.recommendation, confidence=r.confidence,
                                  evidence={"source": SOURCE, "items": r.evidence})


def report(
    db_path: Path = Path("output/centralized.db"),
    output_dir: Path = Path("output/m07_results_synthesis"),
    gpu_price_per_hour: float = 2.5,
    controls: Path = Path("output/controls/controls.json"),
) -> int:
    """Write the results synthesis: report.md, a self-contained interactive report.html and a full data export.

    Reads only the experiment database and the artifacts it points to; writes cost_analysis
    and recommendations rows (replacing an earlier report's).

    Args:
        db_path: the experiment database (fit, test, bench and compare runs write it).
        output_dir: folder for report.md, report.html and data/ (created if missing).
        gpu_price_per_hour: price of one device-hour (currency units, e.g. USD); on CPU
            runs it is applied to CPU hours and the report says so.
        controls: the ``controls.json`` of ``fteval bench controls``; when it exists the report gets a
            "Known-answer controls" section.

    Returns:
        0 on success.
    """
    price = float(gpu_price_per_hour)
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"--gpu_price_per_hour must be a price >= 0 per hour, got {gpu_price_per_hour!r}.")
    db_path, output_dir = Path(db_path), Path(output_dir)
    controls_payload = read_controls(Path(controls))
    db = open_database(db_path)
    try:
        s = gather(db, price)
        s.recommendations = recommend(s)
        export_files = [f"{t}.csv" for t in TABLES]
        blocks = build_blocks(s, export_files)
        if controls_payload is not None:
            at = next((i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.anchor == "data"), len(blocks))
            blocks[at:at] = controls_blocks(controls_payload)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        subtitle = (f"Generated {stamp} from `{db_path}`: {len(s.runs)} training run(s), "
                    f"{'one evaluation' if s.evaluation else 'no evaluation'}, {len(s.benchmarks)} benchmark row(s).")
        md = to_markdown(TITLE, [Para(subtitle)] + blocks)
        page = to_html(TITLE, blocks, subtitle)
        _store(db, s)
    finally:
        db.close()
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "report.md", md)
    write_text_atomic(output_dir / "report.html", page)
    export(db_path, output_dir / "data", ["csv", "json"])
    print(f"[fteval] report written: {output_dir / 'report.md'}, {output_dir / 'report.html'} "
          f"({len(s.recommendations)} recommendations, {len(s.costs)} cost lines); data export in {output_dir / 'data'}")
    return 0
