"""Every pair of models of one ``fteval test`` run, compared on the same prompts, with corrected p-values.

Pairs: for variants ``[baseline, m_1, ..., m_k]`` in that order, every (later, earlier) pair:
``m_i vs baseline`` and ``m_j vs m_i`` (i < j), Delta = later - earlier. A pair holds:

* separation (:func:`embedding_comparison`): paired bias-corrected Deltas (``delta``) of aqi,
  aqi_bounded, xbi and chi with jackknife CIs and p-values of that same Delta
  (:func:`fteval.eval.separation_paired.paired_from_fits`), the plug-in Delta of each as computed
  (``delta_plugin``), the Delta of the mean silhouette with its paired jackknife test
  (:func:`fteval.eval.stats.paired_silhouette_test`), and the smallest bounded-AQI Delta detectable
  at 80% power;
* behaviour (:func:`behaviour_comparison`): refusal rate on unsafe prompts and over-refusal rate on
  safe prompts (full refusals), each with the exact McNemar test on the per-prompt labels, Newcombe's
  paired interval of the rate change and the smallest rate change detectable at 80% power; paired t-tests of every G-Eval criterion.

Multiple comparisons (:func:`correct_families`): every p-value of the run belongs to one of two
families, ``aqi`` (separation Deltas and silhouette tests of all pairs) and ``behaviour``
(McNemar and G-Eval tests of all pairs); each family is Holm- (or BH-) adjusted as one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import stats as sps
from torch import Tensor

from fteval.eval.bootstrap import paired_bootstrap_deltas
from fteval.eval.power import mcnemar_mde, mde_wald
from fteval.eval.separation import SeparationFit, heavy_tailed
from fteval.eval.separation_paired import paired_from_fits
from fteval.eval.stats import (
    SilhouetteFit,
    cohens_d_paired,
    correct_pvalues,
    mcnemar_exact,
    paired_rate_difference_ci,
    paired_silhouette_test,
    paired_ttest,
)

__all__ = ["FAMILIES", "SUMMARY_METRICS", "behaviour_comparison", "bootstrap_comparison", "correct_families",
           "embedding_comparison", "pair_key", "pairs"]

SUMMARY_METRICS = ("aqi", "aqi_bounded", "xbi", "chi")  # the scores with intervals, Deltas and tests
FAMILIES = ("aqi", "behaviour")
POWER, ALPHA = 0.8, 0.05  # the power statements' targets


def pairs(variants: list[str]) -> list[tuple[str, str]]:
    """(a, b) with Delta = a - b: each later variant against each earlier one (baseline first)."""
    return [(variants[j], variants[i]) for j in range(len(variants)) for i in range(j)]


def pair_key(a: str, b: str) -> str:
    """'grit vs qlora'."""
    return f"{a} vs {b}"


def embedding_comparison(fit_a: SeparationFit, fit_b: SeparationFit, raw_a: dict, raw_b: dict,
                         sil_a: SilhouetteFit, sil_b: SilhouetteFit, confidence: float, lam: float) -> dict:
    """Separation Deltas, silhouette test and power of one pair (see the module docstring).

    ``fit_*``: the models' separation fits (:func:`fteval.eval.separation.fit_separation`);
    ``raw_a``/``raw_b``: their plug-in scores (``cluster_scores``); ``sil_*``: their silhouette fits.
    ``heavy_tailed``: :func:`fteval.eval.separation.heavy_tailed` of the bounded-AQI Delta's
    pseudo-value kurtosis and both models' tail shares (the Delta intervals may cover less than stated).
    """
    deltas = paired_from_fits(fit_a, fit_b, confidence=confidence, lam=lam, metrics=SUMMARY_METRICS)
    out: dict = {"n_per_class": int(min(fit_a.counts))}
    for m in SUMMARY_METRICS:
        d = dict(deltas[m])
        # "delta" is the centre of the interval and the test (bias-corrected); the plug-in Delta is kept as such
        out[m] = {"delta": d.pop("delta_bc"), "delta_plugin": float(raw_a[m] - raw_b[m]), **d}
    out["aqi_bounded"]["excess_kurtosis"] = deltas.get("kurtosis")
    out["tail_share"] = max(fit_a.tail_share, fit_b.tail_share)
    out["heavy_tailed"] = heavy_tailed(deltas.get("kurtosis", 0.0), out["tail_share"])
    out["silhouette"] = paired_silhouette_test(sil_a, sil_b, confidence=confidence)
    se = out["aqi_bounded"]["se"]
    out["power"] = {"alpha": ALPHA, "power": POWER,
                    "mde_aqi_bounded": mde_wald(se, ALPHA, POWER) if se else None}  # None: identical models (SE 0)
    return out


def bootstrap_comparison(emb_a: Tensor, emb_b: Tensor, labels: Tensor, n_resamples: int, seed: int,
                         confidence: float, lam: float) -> dict:
    """The spec's procedures for one pair (``statistics: bootstrap``): plug-in Deltas a - b with paired
    percentile bootstrap intervals, paired t-tests on the bootstrap standard error, Cohen's d.

    Per metric: ``delta`` (plug-in), ``ci`` (percentile), ``se`` (SD of the bootstrap Deltas),
    ``t`` = delta / se with N - 2 degrees of freedom and its two-sided ``p_value`` (the test in the
    family), ``p_bootstrap`` (the bootstrap distribution's own two-sided p), ``cohens_d`` = t / sqrt(N)
    (the d_z of per-prompt contributions whose mean is the Delta). Measured by ``fteval bench stats
    --methods``: the percentile intervals sit around the plug-in Delta, which carries the noise floor.
    """
    res = paired_bootstrap_deltas(emb_b, emb_a, labels, n_resamples, seed, metrics=SUMMARY_METRICS,
                                  confidence=confidence, lam=lam)  # tuned = a: Delta = a - b
    n = int(labels.numel())
    out: dict = {"n_per_class": int(min((labels == 0).sum(), (labels == 1).sum())), "heavy_tailed": False}
    for m in SUMMARY_METRICS:
        r = res[m]
        se = float(np.std(r.distribution, ddof=1)) if r.distribution.size > 1 else 0.0
        if se > 0:
            t = r.delta / se
            p = float(2.0 * sps.t.sf(abs(t), n - 2))
        else:
            t, p = (0.0, 1.0) if r.delta == 0 else (float("inf"), 0.0)
        out[m] = {"delta": r.delta, "ci": [r.ci_low, r.ci_high], "se": se, "t": t, "p_value": p,
                  "p_bootstrap": r.p_value, "cohens_d": t / np.sqrt(n) if np.isfinite(t) else None}
    se = out["aqi_bounded"]["se"]
    out["power"] = {"alpha": ALPHA, "power": POWER, "mde_aqi_bounded": mde_wald(se, ALPHA, POWER) if se else None}
    return out


def _refusal_test(codes_a: list[int], codes_b: list[int], full_code: int, confidence: float) -> dict:
    a = np.array([c == full_code for c in codes_a], dtype=np.float64)
    b = np.array([c == full_code for c in codes_b], dtype=np.float64)
    res = mcnemar_exact(a, b)
    discordance = (res.n_a_only + res.n_b_only) / res.n
    both = int(np.sum((a == 1) & (b == 1)))
    return {"rate_a": res.rate_a, "rate_b": res.rate_b, "delta": res.delta, "n": res.n,
            "n_a_only": res.n_a_only, "n_b_only": res.n_b_only, "p_value": res.p_value,
            "ci": list(paired_rate_difference_ci(res.n, both, res.n_a_only, res.n_b_only, confidence)),
            "mde": mcnemar_mde(res.n, discordance, ALPHA, POWER)}


def behaviour_comparison(codes_a: list[int], codes_b: list[int], safety: list[str], geval_a: np.ndarray,
                         geval_b: np.ndarray, criteria: list[str], full_code: int, confidence: float) -> dict:
    """McNemar on refusals (unsafe prompts) and over-refusals (safe prompts), paired G-Eval t-tests.

    ``codes_*``: per-prompt refusal codes of the two models on the same prompts (``full_code`` =
    a full refusal); ``safety``: 'safe'/'unsafe' per prompt; ``geval_*`` ``[n, len(criteria)]``.
    A category with fewer than 2 prompts gets no test.
    """
    out: dict = {}
    for key, category in (("refusal", "unsafe"), ("over_refusal", "safe")):
        idx = [i for i, s in enumerate(safety) if s == category]
        if len(idx) >= 2:
            out[key] = _refusal_test([codes_a[i] for i in idx], [codes_b[i] for i in idx], full_code, confidence)
    for k, crit in enumerate(criteria):
        ga, gb = geval_a[:, k], geval_b[:, k]
        keep = np.isfinite(ga) & np.isfinite(gb)
        if keep.sum() < 2:
            continue
        t = paired_ttest(ga[keep], gb[keep], confidence=confidence)
        out[f"geval_{crit}"] = {"mean_diff": t.mean_diff, "t": t.statistic, "p_value": t.p_value,
                                "ci": [t.ci_low, t.ci_high], "cohens_d": cohens_d_paired(ga[keep], gb[keep])}
    return out


def _family_members(comparisons: dict, family: str) -> list[dict]:
    """The test dicts of one family, in a fixed order (pairs, then metrics)."""
    members = []
    for comp in comparisons.values():
        if family == "aqi":
            members += [comp[m] for m in SUMMARY_METRICS if m in comp]
            members += [comp["silhouette"]] if "silhouette" in comp else []
        else:
            members += list(comp.get("behaviour", {}).values())
    return members


def correct_families(comparisons: dict, method: Literal["holm", "bh"], confidence: float) -> dict[str, int]:
    """Adjust each family's p-values as one (in place: ``p_adjusted``, ``significant``); returns the family sizes.

    Tests without a p-value (NaN from identical inputs, or ``None``) are left out of the family.
    """
    sizes = {}
    for family in FAMILIES:
        members = [t for t in _family_members(comparisons, family)
                   if t.get("p_value") is not None and t["p_value"] == t["p_value"]]
        sizes[family] = len(members)
        if not members:
            continue
        adjusted = correct_pvalues([t["p_value"] for t in members], method)
        for t, adj in zip(members, adjusted):
            t["p_adjusted"] = float(adj)
            t["significant"] = bool(adj < 1.0 - confidence)
            t["family"] = family
    return sizes
