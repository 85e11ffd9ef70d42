"""Paired tests, effect sizes, multiple-comparison corrections and per-prompt separation.

What ``fteval test`` compares models with (:mod:`fteval.eval.headtohead`) and ``fteval compare``
corrects its training tests with. The vectorised bootstrap of the AQI-family scores is in
:mod:`fteval.eval.bootstrap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy import stats as sps
from sklearn.metrics import silhouette_samples
from torch import Tensor

from fteval.eval.metrics import check_clusters, class_stats

__all__ = [
    "McNemarResult",
    "TTestResult",
    "cohens_d_paired",
    "correct_pvalues",
    "mcnemar_exact",
    "paired_rate_difference_ci",
    "paired_ttest",
    "per_prompt_separation",
]


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two paired binary outcomes (e.g. refused / not, per prompt, by two models).

    ``n_a_only``: pairs where only a is 1; ``n_b_only``: only b; ``rate_a`` / ``rate_b`` the two
    rates; ``delta`` = rate_a - rate_b; ``p_value`` two-sided (1.0 without discordant pairs).
    """

    n: int
    n_a_only: int
    n_b_only: int
    rate_a: float
    rate_b: float
    delta: float
    p_value: float


@dataclass(frozen=True)
class TTestResult:
    """Paired t-test of ``a - b``: t statistic, two-sided p, degrees of freedom, mean difference and its CI."""

    statistic: float
    p_value: float
    df: int
    mean_diff: float
    ci_low: float
    ci_high: float
    confidence: float


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per prompt), got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; drop or fix those prompts first.")
    return arr


def _paired_arrays(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}; pair them per prompt.")
    if a.size < 2:
        raise ValueError(f"paired statistics need at least 2 pairs, got {a.size}.")
    return a, b


def paired_ttest(a, b, confidence: float = 0.95) -> TTestResult:
    """Paired t-test of ``a - b`` (``scipy.stats.ttest_rel``), two-sided, with the CI of the mean difference.

    ``a``, ``b``: ``[N]`` per-prompt values of two models on the same prompts (e.g.
    :func:`per_prompt_separation` of tuned and base). Constant differences give NaN (scipy).
    """
    a, b = _paired_arrays(a, b)
    res = sps.ttest_rel(a, b)
    ci = res.confidence_interval(confidence_level=confidence)
    return TTestResult(
        statistic=float(res.statistic),
        p_value=float(res.pvalue),
        df=int(res.df),
        mean_diff=float(np.mean(a - b)),
        ci_low=float(ci.low),
        ci_high=float(ci.high),
        confidence=confidence,
    )


def cohens_d_paired(a, b) -> float:
    """Cohen's d_z for paired samples: mean(a - b) / sd(a - b, ddof=1); NaN if the differences are constant.

    Hand-written: scipy and sklearn have no effect-size function.
    """
    a, b = _paired_arrays(a, b)
    diff = a - b
    sd = float(np.std(diff, ddof=1))
    return float(np.mean(diff) / sd) if sd > 0 else float("nan")


def correct_pvalues(p_values, method: Literal["holm", "bh"] = "holm") -> np.ndarray:
    """Adjust a family of p-values for multiple comparisons; returns adjusted p in the input order.

    ``"bh"``: Benjamini-Hochberg false-discovery-rate adjustment, ``scipy.stats.false_discovery_control``.
    ``"holm"``: Holm's step-down family-wise adjustment, hand-written because scipy has none:
    with p sorted ascending p_(1) <= ... <= p_(m), adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be a 1-D sequence, got shape {p.shape}.")
    if p.size and (not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"p_values must lie in [0, 1], got {p.tolist()}.")
    if p.size == 0:
        return p.copy()
    if method == "bh":
        return np.asarray(sps.false_discovery_control(p, method="bh"), dtype=np.float64)
    if method == "holm":
        order = np.argsort(p, kind="stable")
        m = p.size
        stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
        adjusted = np.empty_like(p)
        adjusted[order] = np.maximum.accumulate(stepped)
        return adjusted
    raise ValueError(f"method must be 'holm' or 'bh', got {method!r}.")


def per_prompt_separation(
    embeddings: Tensor, labels: Tensor, kind: Literal["silhouette", "centroid"] = "silhouette"
) -> np.ndarray:
    """How well each prompt sits in its own class: ``[N]`` float64 in [-1, 1], for paired per-prompt tests.

    ``"silhouette"`` (default): ``sklearn.metrics.silhouette_samples`` with Euclidean distance,
    s_i = (b_i - a_i) / max(a_i, b_i), a_i the mean distance to the other prompts of its class, b_i
    to the prompts of the nearest other class. It is the standard per-sample separation score,
    bounded, and invariant to rescaling the embeddings, so a base and a tuned model whose hidden
    states differ in overall norm are compared fairly (AQI's per-prompt terms, e.g. a squared
    distance to a centroid, are not scale free). O(N^2 D).

    ``"centroid"``: the simplified (centroid) silhouette, a_i and b_i the distances to the own
    class centroid and to the nearest other centroid; O(N K D), for sets too large for the
    pairwise form. Hand-written (sklearn has only the pairwise one).
    """
    emb64, inverse, num_classes = check_clusters(embeddings, labels)
    if kind == "silhouette":
        return silhouette_samples(emb64.cpu().numpy(), inverse.cpu().numpy(), metric="euclidean")
    if kind == "centroid":
        _, centroids, _ = class_stats(emb64, inverse, num_classes)
        dist = torch.cdist(emb64, centroids)  # [N, K]
        own = dist.gather(1, inverse[:, None]).squeeze(1)
        other = dist.scatter(1, inverse[:, None], float("inf")).min(dim=1).values
        denom = torch.maximum(own, other)
        sep = torch.where(denom > 0, (other - own) / denom, torch.zeros_like(denom))
        return sep.cpu().numpy()
    raise ValueError(f"kind must be 'silhouette' or 'centroid', got {kind!r}.")



def mcnemar_exact(a, b) -> McNemarResult:
    """Exact McNemar test: ``scipy.stats.binomtest`` of the discordant counts against 1/2, two-sided.

    ``a``, ``b``: ``[N]`` 0/1 (or bool) per-prompt outcomes of two models on the same prompts.
    Only discordant pairs carry information on a difference of the rates; under H0 (equal
    rates) each is a's with probability 1/2, so the conditional test is exact at any N.
    """
    a, b = _paired_arrays(a, b)
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("mcnemar_exact needs 0/1 outcomes per prompt (e.g. refused or not).")
    a_only = int(np.sum((a == 1) & (b == 0)))
    b_only = int(np.sum((a == 0) & (b == 1)))
    discordant = a_only + b_only
    p = float(sps.binomtest(a_only, discordant, 0.5).pvalue) if discordant else 1.0
    return McNemarResult(n=int(a.size), n_a_only=a_only, n_b_only=b_only, rate_a=float(a.mean()),
                         rate_b=float(b.mean()), delta=float(a.mean() - b.mean()), p_value=p)


def paired_rate_difference_ci(n: int, both: int, a_only: int, b_only: int,
                              confidence: float = 0.95) -> tuple[float, float]:
    """Interval of ``rate_a - rate_b`` for paired binary outcomes: Newcombe's hybrid score interval.

    ``n`` pairs, of which ``both`` are 1 for both models, ``a_only`` only for a, ``b_only`` only
    for b. Newcombe (1998, Statistics in Medicine 17:2635, method 10): the Wilson intervals of
    the two marginal rates (``scipy.stats.binomtest(...).proportion_ci(method='wilson')``) combined
    with the phi correlation of the 2x2 table. Hand-written: neither scipy nor sklearn has a
    paired-proportion interval. Unlike the Wald interval it stays inside [-1, 1] and does not
    collapse to a point when a rate is 0 or 1.
    """
    neither = n - both - a_only - b_only
    if n < 1 or min(both, a_only, b_only, neither) < 0:
        raise ValueError(f"paired counts n={n}, both={both}, a_only={a_only}, b_only={b_only} are not a 2x2 table")
    k_a, k_b = both + a_only, both + b_only
    p_a, p_b = k_a / n, k_b / n
    l_a, u_a = (float(x) for x in sps.binomtest(k_a, n).proportion_ci(confidence, method="wilson"))
    l_b, u_b = (float(x) for x in sps.binomtest(k_b, n).proportion_ci(confidence, method="wilson"))
    denom = float(k_a) * (n - k_a) * k_b * (n - k_b)
    phi = 0.0
    if denom > 0:
        cross = float(both) * neither - float(a_only) * b_only
        if cross > 0:  # Newcombe's continuity adjustment of the numerator
            cross = max(cross - n / 2.0, 0.0)
        phi = cross / np.sqrt(denom)
    delta = p_a - p_b
    low = delta - np.sqrt(max((p_a - l_a) ** 2 - 2 * phi * (p_a - l_a) * (u_b - p_b) + (u_b - p_b) ** 2, 0.0))
    high = delta + np.sqrt(max((u_a - p_a) ** 2 - 2 * phi * (u_a - p_a) * (p_b - l_b) + (p_b - l_b) ** 2, 0.0))
    return float(max(low, -1.0)), float(min(high, 1.0))
