"""The report's sections written from this run's numbers: alignment over training, deployment,
monitoring and QA, scaling and cost, open questions.

Each section follows a fixed rule stated in its function's docstring, so that the same database
always gives the same text and a reader can check every sentence against the tables above it.
Nothing here is boilerplate: a section whose inputs were not measured says which command measures
them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from fteval.analysis.advice import aqi_test
from fteval.backends.base import BASELINE
from fteval.eval.power import mde_wald, prompts_for_delta
from fteval.analysis.document import Block, Bullets, Chart, Heading, Para, Table
from fteval.analysis.document import format_number as _f  # short: used inside many f-strings
from fteval.analysis.runs import RunSummary
from fteval.analysis.synthesis import ALPHA, SMALL_SAMPLE, Synthesis, headline
from fteval.methods import display_name, order_key
from fteval.models.loading import EMBEDDED_NAME, default_cache_dir, is_embedded

__all__ = ["guidance_blocks", "alignment_over_training", "deployment", "monitoring", "scaling", "open_questions",
           "shipped_adapter"]


def _signed(v: Optional[float]) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:+.4f}"


def _se(test: Optional[dict[str, Any]]) -> Optional[float]:
    se = (test or {}).get("details", {}).get("se") if isinstance((test or {}).get("details"), dict) else None
    return float(se) if se is not None else None


def _significant(test: Optional[dict[str, Any]]) -> bool:
    return bool(test) and test.get("p_adjusted") is not None and test["p_adjusted"] < ALPHA


def _adapters(s: Synthesis) -> list[str]:
    return [m for m in (s.evaluation.scores if s.evaluation else {}) if m != BASELINE]


def _run_config(s: Synthesis, run: RunSummary) -> dict[str, Any]:
    return s.run_configs.get(run.label) or {}


# ------------------------------------------------------------------------ alignment over training
def alignment_over_training(s: Synthesis) -> list[Block]:
    """The monitor's Delta (tuned - base, bounded AQI) per check with its 95% band, QLoRA and GRIT side by
    side, and per run the checkpoint ``fteval compare`` would ship (:mod:`fteval.analysis.alignment_curve`)."""
    blocks: list[Block] = [Heading(2, "Alignment over training", "alignment-over-training")]
    if not s.alignment:
        return blocks + [Para("Not measured: no training run recorded the alignment monitor's curve "
                              "(callbacks.alignment.AlignmentMonitor, listed in the training configs).")]
    blocks.append(Para("Bias-corrected bounded AQI of the model with its adapter minus without it, on the monitor's fixed "
                       "prompts, at each check, with the 95% interval as a band. A check erodes alignment when its whole "
                       "interval is below 0. The chosen checkpoint has the lowest smoothed training loss among the saved "
                       "checkpoints that did not erode alignment."))
    rows, colours = [], ["#2b6cb0", "#dd6b20", "#2f855a", "#b83280", "#6b46c1", "#c53030"]
    labels = [r.label for r in s.runs]
    methods = sorted({label.split("#")[0] for label in s.alignment}, key=order_key)  # registry order
    for method in methods:
        series = []
        for label, (checks, choice) in s.alignment.items():
            if label.split("#")[0] != method:
                continue
            c = colours[labels.index(label) % len(colours)] if label in labels else colours[0]
            series.append({"name": f"{label} Delta", "color": c, "markers": True, "band": True,
                           "points": [{"x": k.step, "y": k.delta, "lo": k.delta_low, "hi": k.delta_high} for k in checks]})
            if choice is not None:
                k = choice.check
                rows.append([label, str(len(checks)), _signed(checks[-1].delta), f"{choice.lowest.step} ({_signed(choice.lowest.delta)})",
                             str(choice.first_eroded_step or "none"), str(k.step), _f(k.loss),
                             f"{_signed(k.delta)} [{_signed(k.delta_low)}, {_signed(k.delta_high)}]",
                             Path(k.checkpoint).name if k.checkpoint else "not saved", choice.reason])
        blocks.append(Chart({"id": f"chart-align-{method}", "kind": "line", "small": len(methods) > 1,
                             "width": 560 if len(methods) > 1 else 860, "height": 320,
                             "title": f"{display_name(method)}: Delta AQI (bounded) over training", "xlabel": "optimizer step",
                             "ylabel": "Delta AQI (bounded)", "integerX": True, "series": series,
                             "hlines": [{"y": 0.0, "label": "no change"}]}))
    blocks.append(Table(["run", "checks", "last Delta", "lowest Delta at step", "first eroded step", "chosen step",
                         "smoothed loss", "its Delta [95% CI]", "checkpoint", "why"], rows, (1, 2, 5, 6)))
    return blocks


# ------------------------------------------------------------------------------------ deployment
def shipped_adapter(s: Synthesis) -> tuple[Optional[str], str]:
    """The adapter to ship and why.

    Rule: an adapter whose bounded-AQI Delta against the baseline is significantly negative (Holm-adjusted
    p < 0.05) is excluded. Of the rest, the one whose head-to-head test against every other is significant
    in its favour (all pairs, Holm over the family); otherwise the lower task loss (final validation loss,
    else smoothed final training loss), since alignment does not tell them apart. (None, reason) when no
    adapter qualifies.
    """
    adapters = _adapters(s)
    if not adapters:
        return None, "no adapter was evaluated (python -m fteval test --config configs/aqi.yaml)"
    eroded = [m for m in adapters if _significant(aqi_test(s, m, BASELINE)) and aqi_test(s, m, BASELINE)["statistic"] < 0]
    kept = [m for m in adapters if m not in eroded]
    if not kept:
        return None, (f"every adapter ({', '.join(eroded)}) lowered the safe/unsafe separation significantly; ship the "
                      "baseline, or retrain with the alignment monitor's stop_if_delta_below set")
    note = f" ({', '.join(eroded)} excluded: alignment significantly lowered)" if eroded else ""
    for a in kept if len(kept) > 1 else ():
        wins = []
        for b in (m for m in kept if m != a):
            t = aqi_test(s, a, b) or aqi_test(s, b, a)
            if not _significant(t) or (t["statistic"] > 0) != (t["group_a"] == a):
                break
            wins.append((b, t))
        else:
            b, t = min(wins, key=lambda w: abs(w[1]["statistic"]))  # the closest rival
            lo, hi = sorted((abs(t["ci_low"]), abs(t["ci_high"]))) if t.get("ci_low") is not None else (None, None)
            return a, (f"its bounded AQI is higher than {b}'s by {abs(t['statistic']):.4f} [{_f(lo)}, {_f(hi)}] "
                       f"(Holm-adjusted p {t['p_adjusted']:.3g})" + (" and significantly above every other adapter's"
                                                                      if len(kept) > 2 else "") + note)

    def loss(m: str) -> float:
        run = s.adapter_runs.get(m)
        if run is None:
            return math.inf
        v = run.final_val_loss if math.isfinite(run.final_val_loss) else run.final_train_loss_smoothed
        return v if math.isfinite(v) else math.inf

    best = min(kept, key=lambda m: (loss(m), m))
    why = ("no adapter's alignment differs significantly from the other's, so the task loss decides: "
           f"{best} has the lowest ({_f(loss(best))})" if len(kept) > 1 else
           f"the only adapter whose alignment is not significantly below the baseline's")
    return best, why + note


def deployment(s: Synthesis) -> list[Block]:
    """Which adapter to ship (:func:`shipped_adapter`), from which step, and the commands that serve it."""
    blocks: list[Block] = [Heading(2, "Deployment guidance", "deployment")]
    best, why = shipped_adapter(s)
    if best is None:
        return blocks + [Para(f"Ship no adapter: {why}.")]
    path = s.evaluation.adapters.get(best, f"<{best} adapter folder>")
    run = s.adapter_runs.get(best)
    hp = (_run_config(s, run).get("hparams") or {}) if run else {}
    base = hp.get("model_name_or_path") or "<base model>"
    if is_embedded(base):  # the safetensors folder the embedded GGUF was converted into on first use
        base = str(Path(hp.get("cache_dir") or default_cache_dir()) / "models" / EMBEDDED_NAME)
    rank = hp.get("r") or (run.lora_rank if run else None) or 16
    text = f"Ship **{best}** (`{path}`): {why}."
    choice = s.alignment.get(run.label, (None, None))[1] if run else None
    if choice is not None and choice.check.step != run.n_steps:
        text += (f" Its alignment curve prefers step {choice.check.step} ({choice.reason}); the exported adapter is the "
                 f"last step's ({run.n_steps})"
                 + (f"; the checkpoint of step {choice.check.step} is `{choice.check.checkpoint}`." if choice.check.checkpoint
                    else "."))
    blocks.append(Para(text))
    merged = f"output/merged/{best}"
    blocks.append(Bullets([
        f"vLLM, adapter on the base: `vllm serve {base} --enable-lora --lora-modules {best}={path} --max-lora-rank {rank}`",
        f"merged model (no adapter at serving time): `python -m fteval merge {path} {merged}`, then `vllm serve {merged}`",
        f"llama.cpp: after the merge, `python convert_hf_to_gguf.py {merged} --outfile {best}.gguf --outtype q8_0` (from a "
        f"llama.cpp checkout), then `llama-server -m {best}.gguf` or `python -m llama_cpp.server --model {best}.gguf`",
        "check the served model before switching traffic: `python -m fteval bench generation` against the endpoint, and the "
        "thresholds of the next section",
    ]))
    return blocks


# ------------------------------------------------------------------------------------ monitoring
def _behaviour_row(s: Synthesis, model: str, metric: str) -> Optional[dict[str, Any]]:
    return next((r for r in s.behavioral if r["model"] == model and r["metric"] == metric), None)


def monitoring(s: Synthesis) -> list[Block]:
    """What to watch after deployment and during further fine-tuning, with thresholds from this run's intervals:
    a re-evaluation on the same prompts that falls outside the shipped model's 95% interval is a change beyond
    this run's sampling noise; the alignment monitor's stop threshold is minus the Delta detectable at 80% power."""
    blocks: list[Block] = [Heading(2, "Monitoring and QA", "monitoring")]
    best, _ = shipped_adapter(s)
    model = best or BASELINE
    ev = s.evaluation
    if ev is None:
        return blocks + [Para("Not measured: thresholds come from an evaluation (python -m fteval test --config configs/aqi.yaml).")]
    items = []
    scores = ev.scores.get(model) or {}
    row = headline(scores, "aqi_bounded")
    if row and row.get("ci_low") is not None:
        items.append(f"bounded AQI of {model} on these {ev.n_prompts} prompts: {_f(row['value'])} [{_f(row['ci_low'])}, "
                     f"{_f(row['ci_high'])}]; alert when a re-evaluation (`python -m fteval test`, same prompts) gives less "
                     f"than **{_f(row['ci_low'])}**")
    for metric, side, what, edge in (("refusal_rate", "ci_low", "below", 0.0), ("over_refusal_rate", "ci_high", "above", 1.0)):
        r = _behaviour_row(s, model, metric)
        if r and r.get(side) is not None:
            measured = (f"{metric.replace('_', ' ')} of {model}: {_f(r['value'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}] "
                        f"on {r['n_samples']} prompts; ")
            items.append(measured + (f"alert {what} **{_f(r[side])}**" if r[side] != edge else
                                     f"no alert threshold: the interval reaches {edge:g}, so only more prompts "
                                     "(behaviour_prompts_per_class) can give one"))
    for r in s.behavioral:
        if r["model"] == model and r["metric"].startswith("geval") and r.get("ci_low") is not None:
            items.append(f"{r['metric']}: {_f(r['value'])} [{_f(r['ci_low'])}, {_f(r['ci_high'])}]; alert below {_f(r['ci_low'])}")
    t = aqi_test(s, model, BASELINE) if model != BASELINE else None
    se = _se(t)
    if se is not None:
        mde = mde_wald(se)
        items.append(f"further fine-tuning: `AlignmentMonitor(stop_if_delta_below: {-mde:.4f}, patience: 2)` stops a run "
                     f"whose Delta stays below minus the change this prompt set detects at 80% power ({mde:.4f} = "
                     f"{mde / se:.4g} x its standard error {se:.4f})")
    if ev.n_prompts is not None and ev.n_prompts < 2 * SMALL_SAMPLE:
        items.append(f"these thresholds rest on {ev.n_prompts} prompts: they flag only large changes; evaluate "
                     "500 per class on a GPU for tighter ones")
    return blocks + [Bullets(items or ["Not measured: no interval of the shipped model was recorded."])]


# ------------------------------------------------------------------------------------ scaling
def _examples_per_step(s: Synthesis, run: RunSummary) -> Optional[int]:
    cfg = _run_config(s, run)
    batch = ((cfg.get("cli") or {}).get("data") or {}).get("batch_size")
    trainer = cfg.get("trainer") or {}
    if not batch:
        return None
    return int(batch) * int(trainer.get("accumulate_grad_batches") or 1) * int(trainer.get("world_size") or 1)


def scaling(s: Synthesis) -> list[Block]:
    """Measured throughput turned into hours and cost: per 1M training tokens (median tokens/s), per 1k training
    examples (fit time / examples seen, examples = optimizer steps x batch x accumulation x devices, when the run's
    config records its batch size) and per 1M generated tokens (the inference benchmarks), and each
    method's return over the first method in :mod:`fteval.methods` order that was measured (QLoRA when
    it was): its extra cost per 1k examples against its head-to-head bounded-AQI Delta."""
    blocks: list[Block] = [Heading(2, "Scaling and cost", "scaling")]
    price, rows, per_k = s.price_per_hour, [], {}
    for run in s.runs:
        eps = _examples_per_step(s, run)
        tokens_h = 1e6 / run.tokens_per_s / 3600.0 if math.isfinite(run.tokens_per_s) and run.tokens_per_s > 0 else None
        hours = None
        if eps is not None and math.isfinite(run.fit_seconds) and run.n_steps > 0:
            hours = run.fit_seconds * run.world_size / 3600.0 / (run.n_steps * eps) * 1000.0
            per_k[run.method] = hours
        if tokens_h is None and hours is None:
            continue
        rows.append([run.label, run.device_name, _f(run.tokens_per_s), _f(tokens_h), _f(eps), _f(hours),
                     _f(None if hours is None else hours * price)])
    if rows:
        blocks.append(Table(["run", "device", "training tokens/s (median)", "hours per 1M training tokens",
                             "examples per step", "hours per 1k examples", f"cost per 1k examples (at {price:g}/h)"],
                            rows, (2, 3, 4, 5, 6)))
    else:
        blocks.append(Para("Training cost not measured: no run recorded its speed or duration."))
    gen = [c for c in s.costs if c.item == "inference_per_1m_tokens"]
    if gen:
        blocks.append(Table(["backend:model", "tokens/s", "hours per 1M tokens", f"cost per 1M tokens (at {price:g}/h)"],
                            [[c.subject, _f(c.details.get("tokens_per_s")), _f(c.hours), _f(c.cost)] for c in gen],
                            (1, 2, 3)))
    else:
        blocks.append(Para("Generation cost not measured: `python -m fteval bench generation` fills inference_benchmarks."))
    ranked = sorted(per_k, key=order_key)
    for ref, m in ((ranked[0], m) for m in ranked[1:]):
        blocks.append(Para(_cost_return(s, m, ref, per_k, price)))
    if s.runs and all(r.device == "cpu" for r in s.runs):
        blocks.append(Para("These runs used a CPU: they say nothing about GPU hours (BENCHMARKS.md has the H200 "
                           "throughput at Llama-3-8B shape).", note=True))
    return blocks


def _cost_return(s: Synthesis, m: str, ref: str, per_k: dict[str, float], price: float) -> str:
    """One sentence: method ``m``'s extra cost per 1k examples over ``ref`` against its bounded-AQI difference."""
    extra = per_k[m] / per_k[ref] - 1.0
    t = aqi_test(s, m, ref) or aqi_test(s, ref, m)  # the evaluation tests each pair once, in either order
    sign = 1.0 if t is None or t["group_a"] == m else -1.0
    text = f"{display_name(m)} costs {extra:+.1%} per 1k training examples against {display_name(ref)} on this machine."
    if _significant(t):
        gain = sign * t["statistic"]
        text += (f" Its bounded AQI differs by {gain:+.4f} (Holm-adjusted p {t['p_adjusted']:.3g}): "
                 + (f"{gain / (per_k[m] - per_k[ref]) / price:+.4g} bounded AQI per unit of extra cost per 1k examples."
                    if per_k[m] != per_k[ref] and price > 0 else "at no extra cost."))
    elif t is not None:
        text += (f" Its bounded-AQI difference ({sign * t['statistic']:+.4f}, Holm-adjusted p {t['p_adjusted']:.3g}) is not "
                 "significant: this run shows no alignment return for the difference in cost.")
    return text


# ------------------------------------------------------------------------------------ open questions
def open_questions(s: Synthesis) -> list[Block]:
    """Questions this run leaves open, each from a measured gap: a non-significant difference smaller than what the
    prompt set can detect (with the prompts per class that would detect it), one seed per method, short training,
    a noisy alignment curve, and every stage without data."""
    items = []
    ev = s.evaluation
    if ev is not None:
        names = _adapters(s)
        pairs = [(m, BASELINE) for m in names] + [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        for a, b in pairs:
            t = aqi_test(s, a, b) or aqi_test(s, b, a)
            se = _se(t)
            if t is None or se is None or _significant(t) or not t["statistic"]:
                continue
            mde = mde_wald(se)
            per_class = (ev.n_prompts or 0) // 2
            need = prompts_for_delta(se, per_class, abs(t["statistic"])) if per_class else None
            items.append(f"Is {t['group_a']} vs {t['group_b']} real? Delta {t['statistic']:+.4f} (Holm-adjusted p "
                         f"{t['p_adjusted']:.3g}); this prompt set detects {mde:.4f} at 80% power"
                         + (f"; about {need} prompts per class would detect {abs(t['statistic']):.4f} (before the "
                            "multiple-comparison correction)." if need else "."))
    methods = [r.method for r in s.runs]
    if s.runs and any(methods.count(m) < 2 for m in set(methods)):
        items.append("How much of the difference is the seed? One training run per method: repeat each with other "
                     "seed_everything values and compare across runs.")
    if any(r.n_steps < 100 for r in s.runs):
        items.append("Does the ordering hold after convergence? Some runs trained under 100 optimizer steps.")
    noisy = [label for label, (checks, _) in s.alignment.items()
             if any(k.delta_low is not None and k.delta_high - k.delta_low > 0.05 for k in checks)]
    if noisy:
        items.append(f"When does alignment start to erode? The monitor's intervals are wider than 0.05 for "
                     f"{', '.join(noisy)}: raise its n_per_class to see the curve's shape.")
    if not s.benchmarks:
        items.append("What does serving cost? No inference benchmark was recorded.")
    return [Heading(2, "Open questions", "open-questions"),
            Bullets(items or ["None that this run's data raises."])]


def guidance_blocks(s: Synthesis) -> list[Block]:
    return deployment(s) + monitoring(s) + scaling(s) + open_questions(s)
