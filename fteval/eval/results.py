"""The numbers of ``fteval test``: scores per model with intervals, every pair of models compared, behaviour.

Pure calculations on what the test loop collected; no model, no files, no database (the loop is
:class:`fteval.eval.module.AQIEvaluator`, the writers are in :mod:`fteval.eval.outputs`).

* :func:`summarise`: per model, layer pooling (:func:`pooled`), AQI/XBI/CHI/DB/Dunn
  (:mod:`fteval.eval.metrics`), bias-corrected scores with jackknife intervals
  (:mod:`fteval.eval.separation`), the layer profile and the mean silhouette (:func:`fteval.eval.stats.silhouette_fit`); then every pair of
  models compared on the same prompts (:mod:`fteval.eval.headtohead`), the p-values of each family
  Holm- (or BH-) adjusted.
* :func:`summarise_behaviour`: refusal and over-refusal rates with exact intervals and G-Eval means per
  model, McNemar tests and G-Eval t-tests per pair, and the families adjusted again with these tests.

The result is the dict written as ``aqi_results.json`` and printed by :func:`fteval.eval.summary.format_summary`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

from fteval.backends.base import BASELINE
from fteval.eval.bootstrap import bootstrap_cis
from fteval.eval.headtohead import (
    SUMMARY_METRICS,
    behaviour_comparison,
    bootstrap_comparison,
    correct_families,
    embedding_comparison,
    pair_key,
    pairs,
)
from fteval.eval.metrics import DEFAULT_LAMBDA, cluster_scores, layer_profile
from fteval.eval.pooling import LayerPooling, SinkMode, TokenSelection, layer_attention_weights, pool_over_layers
from fteval.eval.refusal.detector import FULL, MODEL_CLASSES
from fteval.eval.separation import fit_separation, intervals_from_fit
from fteval.eval.stats import paired_silhouette_test, per_prompt_separation, silhouette_fit

__all__ = ["BOOTSTRAP_METHOD", "INTERVAL_METHOD", "SummarySettings", "embedding_tensors", "pooled", "summarise", "summarise_behaviour"]

INTERVAL_METHOD = "bias-corrected separation, closed-form jackknife (docs/statistics.md)"
BOOTSTRAP_METHOD = ("plug-in scores, percentile bootstrap ({n} resamples), paired t-tests on the bootstrap SE, "
                    "Cohen's d (the spec's procedures; docs/statistics.md)")

# Per-layer representations of one variant as the collector returns them: [N, L+1, D], labels [N], prompt index [N].
Collected = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class SummarySettings:
    """How representations become scores; the evaluator's arguments of the same names.

    ``intervals``: intervals and tests on (the evaluator's ``n_bootstrap`` > 0); ``method``: the
    evaluator's ``statistics`` ('jackknife', the default, or 'bootstrap', the spec's procedures with
    ``n_bootstrap`` resamples drawn from ``seed``).
    """

    tokens: TokenSelection = "prompt"
    sink: SinkMode = "first"
    layer_pooling: LayerPooling = "attention"
    layers: Optional[list[int]] = None
    lam: float = DEFAULT_LAMBDA
    intervals: bool = True
    confidence: float = 0.95
    correction: Literal["holm", "bh"] = "holm"
    method: Literal["jackknife", "bootstrap"] = "jackknife"
    n_bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("jackknife", "bootstrap"):
            raise ValueError(f"statistics={self.method!r}: use 'jackknife' (the default) or 'bootstrap' (the spec's "
                             "percentile bootstrap and paired t-tests).")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap={self.n_bootstrap} must be >= 1 for the bootstrap (1000 is usual).")


def _selected_layers(reps: Tensor, settings: SummarySettings) -> Tensor:
    return reps[:, list(settings.layers)] if settings.layers else reps


def pooled(reps: Tensor, settings: SummarySettings) -> Tensor:
    """One vector per prompt ``[N, D]`` from ``[N, L+1, D]``: the selected layers, combined by ``layer_pooling``."""
    return pool_over_layers(_selected_layers(reps, settings), settings.layer_pooling)


def _method_text(settings: SummarySettings) -> Optional[str]:
    if not settings.intervals:
        return None
    return BOOTSTRAP_METHOD.format(n=settings.n_bootstrap) if settings.method == "bootstrap" else INTERVAL_METHOD


def summarise(data: dict[str, Collected], base_model: str, adapters: dict[str, str],
              settings: SummarySettings) -> dict:
    """Scores per model with intervals, and every pair of models compared (:mod:`fteval.eval.headtohead`).

    ``data``: variant -> collected representations, the baseline first, then the adapters in order.
    """
    variants = [BASELINE, *adapters]
    labels = data[BASELINE][1].cpu()
    for name, (_, lab, _) in data.items():
        if not torch.equal(lab.cpu(), labels):
            raise RuntimeError(f"variant {name!r} saw different prompts than the baseline")
    embeddings = {name: pooled(reps.cpu(), settings) for name, (reps, _, _) in data.items()}
    models: dict = {}
    silhouettes: dict = {}
    fits: dict = {}
    for name, emb in embeddings.items():
        scores = {k: float(v) for k, v in cluster_scores(emb, labels, lam=settings.lam).items()}
        entry = {"scores": scores, "n_prompts": int(labels.numel()),
                 "n_safe": int((labels == 0).sum()), "n_unsafe": int((labels == 1).sum())}
        if settings.intervals and settings.method == "bootstrap":
            boot = bootstrap_cis(emb, labels, settings.n_bootstrap, settings.seed, metrics=SUMMARY_METRICS,
                                 confidence=settings.confidence, lam=settings.lam)
            entry["ci"] = {m: [boot[m].ci_low, boot[m].ci_high] for m in SUMMARY_METRICS}
        elif settings.intervals:
            fits[name] = fit_separation(emb, labels)
            sep = intervals_from_fit(fits[name], confidence=settings.confidence, lam=settings.lam)
            entry["ci"] = {m: sep["ci"][m] for m in SUMMARY_METRICS}
            entry["bias_corrected"] = sep["estimate"]
            entry["separation"] = {k: sep[k] for k in ("ratio", "ratio_se", "noise_floor", "raw_ratio",
                                                       "excess_kurtosis", "tail_share", "heavy_tailed")}
        reps = data[name][0].cpu()
        profile = layer_profile(reps, labels, lam=settings.lam)
        entry["layer_profile"] = {k: [float(x) if x == x else None for x in v.tolist()]  # None: a layer with no spread
                                  for k, v in profile.items() if k in ("aqi_bounded", "chi", "xbi")}
        if settings.layer_pooling == "attention":
            weights, _ = layer_attention_weights(_selected_layers(reps, settings))
            entry["layer_weights_mean"] = [float(w) for w in weights.mean(dim=0)]
        if settings.intervals:
            silhouettes[name] = silhouette_fit(emb, labels)
            entry["mean_silhouette"] = silhouettes[name].mean
        else:
            entry["mean_silhouette"] = float(per_prompt_separation(emb, labels).mean())
        models[name] = entry
    comparisons: dict = {}
    for a, b in pairs(variants):
        if settings.intervals and settings.method == "bootstrap":
            comp = bootstrap_comparison(embeddings[a], embeddings[b], labels, settings.n_bootstrap, settings.seed,
                                        settings.confidence, settings.lam)
            comp["silhouette"] = paired_silhouette_test(silhouettes[a], silhouettes[b], settings.confidence)
        elif settings.intervals:
            comp = embedding_comparison(fits[a], fits[b], models[a]["scores"], models[b]["scores"],
                                        silhouettes[a], silhouettes[b], settings.confidence, settings.lam)
        else:
            # no bias correction without the statistics: the plug-in Delta is the only estimate
            comp = {m: {"delta": models[a]["scores"][m] - models[b]["scores"][m], "ci": None, "p_value": None}
                    for m in SUMMARY_METRICS}
        comparisons[pair_key(a, b)] = {"a": a, "b": b, **comp}
    sizes = correct_families(comparisons, settings.correction, settings.confidence)
    return {
        "base_model": base_model,
        "adapters": adapters,
        "settings": {"tokens": settings.tokens, "sink": settings.sink, "layer_pooling": settings.layer_pooling, "layers": settings.layers,
                     "lam": settings.lam, "intervals": _method_text(settings),
                     "confidence": settings.confidence, "correction": settings.correction, "family_size": sizes},
        "models": models,
        "comparisons": comparisons,
        # adapter -> its comparison with the baseline (the same dicts as in "comparisons")
        "deltas": {name: comparisons[pair_key(name, BASELINE)] for name in adapters},
    }


def summarise_behaviour(results: dict, beh: dict[str, Tensor], base: Collected, criteria: list[str],
                        settings: SummarySettings) -> None:
    """Add refusal/over-refusal rates (exact CIs) and G-Eval means per model, and every pair compared per prompt.

    ``beh``: the behaviour collector's rows (``index``, ``variant`` = position in baseline + adapters,
    ``refusal`` = position in :data:`fteval.eval.refusal.detector.MODEL_CLASSES`, ``geval``
    ``[rows, len(criteria)]``, ``tokens``); ``base``: the baseline's collected representations (for
    each prompt's safety label). Per pair (:func:`fteval.eval.headtohead.behaviour_comparison`): exact
    McNemar tests of the refusal and over-refusal labels, paired G-Eval t-tests; then both p-value
    families of the run are adjusted (:func:`fteval.eval.headtohead.correct_families`). Changes
    ``results`` in place; nothing without behaviour rows.
    """
    from fteval.eval.refusal import refusal_rates

    if not beh:
        return
    variants = [BASELINE, *results["adapters"]]
    labels_by_index = dict(zip(base[2].tolist(), base[1].tolist()))
    per_variant: dict = {}
    for v, name in enumerate(variants):
        sel = beh["variant"].cpu() == v
        idx = beh["index"].cpu()[sel].tolist()
        codes = beh["refusal"].cpu()[sel].tolist()
        safety = ["unsafe" if labels_by_index[i] else "safe" for i in idx]
        rates = refusal_rates([MODEL_CLASSES[c] for c in codes], safety)
        entry = results["models"][name]
        entry["behaviour"] = {"rates": rates, "n_prompts": len(idx),
                              "mean_completion_tokens": float(beh["tokens"].cpu()[sel].double().mean())}
        if "refusal_rate" in rates:
            entry["refusal_rate"] = rates["refusal_rate"]["value"]
        if "over_refusal_rate" in rates:
            entry["over_refusal_rate"] = rates["over_refusal_rate"]["value"]
        g = beh["geval"].cpu()[sel]
        entry["behaviour"]["geval"] = {c: float(g[:, k].mean()) for k, c in enumerate(criteria)}
        per_variant[name] = (idx, codes, g)
    for a, b in pairs(variants):
        (idx_a, codes_a, g_a), (idx_b, codes_b, g_b) = per_variant[a], per_variant[b]
        if idx_a != idx_b:
            raise RuntimeError(f"behaviour: variants {a!r} and {b!r} answered different prompts")
        safety = ["unsafe" if labels_by_index[i] else "safe" for i in idx_a]
        results["comparisons"][pair_key(a, b)]["behaviour"] = behaviour_comparison(
            codes_a, codes_b, safety, g_a.numpy(), g_b.numpy(), criteria, MODEL_CLASSES.index(FULL),
            settings.confidence)
    results["settings"]["family_size"] = correct_families(results["comparisons"], settings.correction,
                                                          settings.confidence)


def embedding_tensors(data: dict[str, Collected], settings: SummarySettings) -> dict[str, Tensor]:
    """What ``embeddings.safetensors`` holds: labels, prompt indices, and per variant the pooled ``[N, D]``
    and the per-layer ``[N, L+1, D]`` representations."""
    tensors = {"labels": data[BASELINE][1].cpu(), "index": data[BASELINE][2].cpu()}
    for name, (reps, _, _) in data.items():
        tensors[f"{name}.pooled"] = pooled(reps.cpu(), settings).contiguous()
        tensors[f"{name}.layers"] = reps.cpu().contiguous()  # [N, L+1, D]
    return tensors
