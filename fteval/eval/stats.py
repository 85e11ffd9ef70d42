"""Paired tests, effect sizes, multiple-comparison corrections and per-prompt separation.

What ``fteval test`` compares models with (:mod:`fteval.eval.headtohead`) and ``fteval compare``
corrects its training tests with. The vectorised bootstrap of the AQI-family scores is in
:mod:`fteval.eval.bootstrap`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from scipy import stats as sps
from sklearn.metrics import pairwise_distances, silhouette_samples
from torch import Tensor

from fteval.eval.metrics import check_clusters, class_stats

__all__ = [
    "McNemarResult",
    "SilhouetteFit",
    "TTestResult",
    "cohens_d_paired",
    "correct_pvalues",
    "mcnemar_exact",
    "paired_rate_difference_ci",
    "paired_ttest",
    "paired_silhouette_test",
    "per_prompt_separation",
    "silhouette_fit",
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


@dataclass(frozen=True)
class SilhouetteFit:
    """Per-prompt silhouettes of one model and the N leave-one-out means of them.

    ``per_prompt`` ``[N]`` equals ``sklearn.metrics.silhouette_samples``; ``mean`` is their mean (the
    summary's mean silhouette); ``loo_means`` ``[N]``: the mean silhouette of the other N - 1
    prompts with prompt i removed from the data (every other prompt's a and b recomputed without
    it); ``inverse`` ``[N]`` the class index of each prompt.
    """

    per_prompt: np.ndarray
    mean: float
    loo_means: np.ndarray
    inverse: np.ndarray
    second_order: Optional[np.ndarray] = None  # [N, N] w_jl A_jl (see silhouette_fit), None above GRAM_MAX_PROMPTS


def _silhouette(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(b - a) / max(a, b), 0 where both are 0 (sklearn's convention)."""
    denom = np.maximum(a, b)
    return np.divide(b - a, denom, out=np.zeros_like(denom), where=denom > 0)


def silhouette_fit(embeddings: Tensor, labels: Tensor, chunk: int = 512) -> SilhouetteFit:
    """Silhouettes of a two-class embedding matrix with closed-form leave-one-out means (for the jackknife).

    Distances: ``sklearn.metrics.pairwise_distances`` (Euclidean), O(N^2 D). With per-prompt sums
    of distances to the own class (``S_j``) and to the other class (``T_j``), removing prompt i
    changes prompt j's terms only through d_ij: a_j = (S_j - d_ij) / (n_own - 2) when i shares j's
    class, else b_j = (T_j - d_ij) / (n_other - 1). All N leave-one-out means then cost O(N^2)
    (rows of i in chunks of ``chunk``). Hand-written: sklearn has the silhouette, not its jackknife.
    Needs two classes of >= 3 prompts.
    """
    emb64, inverse_t, num_classes = check_clusters(embeddings, labels)
    inverse = inverse_t.cpu().numpy()
    counts = np.bincount(inverse, minlength=num_classes)
    if num_classes != 2 or counts.min() < 3:
        raise ValueError(f"the silhouette jackknife needs two classes of >= 3 prompts, got class sizes {counts.tolist()}.")
    x = emb64.cpu().numpy()
    dist = pairwise_distances(x, metric="euclidean")  # [N, N]
    np.fill_diagonal(dist, 0.0)
    same = inverse[:, None] == inverse[None, :]  # [N, N]
    own_sum = np.where(same, dist, 0.0).sum(axis=1)  # [N] S_j (the diagonal is 0)
    other_sum = dist.sum(axis=1) - own_sum  # [N] T_j
    n_own = counts[inverse].astype(np.float64)  # [N]
    n_other = counts[1 - inverse].astype(np.float64)
    a, b = own_sum / (n_own - 1), other_sum / n_other
    per_prompt = _silhouette(a, b)
    n = x.shape[0]
    loo = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        d = dist[rows]  # [c, N]: d[i, j] = distance of removed prompt i to prompt j
        sm = same[rows]
        a_i = np.where(sm, (own_sum[None, :] - d) / (n_own[None, :] - 2), a[None, :])  # [c, N]
        b_i = np.where(sm, b[None, :], (other_sum[None, :] - d) / (n_other[None, :] - 1))
        s_i = _silhouette(a_i, b_i)
        idx = np.arange(rows.start, rows.stop)
        s_i[idx - rows.start, idx] = 0.0  # prompt i itself is not in its own leave-one-out mean
        loo[rows] = s_i.sum(axis=1) / (n - 1)
    return SilhouetteFit(per_prompt=per_prompt, mean=float(per_prompt.mean()), loo_means=loo, inverse=inverse,
                         second_order=_second_order_terms(dist, same, a, b, counts, inverse))


def _second_order_terms(dist: np.ndarray, same: np.ndarray, a: np.ndarray, b: np.ndarray, counts: np.ndarray,
                        inverse: np.ndarray) -> Optional[np.ndarray]:
    """[N, N] w_jl A_jl: the degenerate (second-order) part of the mean silhouette, per pair of prompts.

    Linearised in the distances, the mean silhouette is sum_{j<l} w_jl d_jl + const with
    w_jl = d mean / d d_jl; A_jl is d_jl double-centred within its pair of classes (row, column and
    block means removed), the estimate of the degenerate Hoeffding term of d_jl. The variance of
    the statistic's second-order part is then about sum_{j<l} (w_jl A_jl)^2, the part the
    jackknife counts twice (as for the separation Deltas, :mod:`fteval.eval.separation`).
    """
    from fteval.eval.separation import GRAM_MAX_PROMPTS

    n = dist.shape[0]
    if n > GRAM_MAX_PROMPTS:
        return None
    b_larger = b >= a
    safe_b = np.where(b > 0, b, 1.0)
    safe_a = np.where(a > 0, a, 1.0)
    ds_da = np.where(b_larger, -1.0 / safe_b, -b / safe_a**2)  # [N]
    ds_db = np.where(b_larger, a / safe_b**2, 1.0 / safe_a)
    n_own = counts[inverse].astype(np.float64)
    n_other = counts[1 - inverse].astype(np.float64)
    own_w, other_w = ds_da / (n_own - 1), ds_db / n_other  # d s_j / d d_jl for l in j's class / the other
    w = np.where(same, own_w[:, None] + own_w[None, :], other_w[:, None] + other_w[None, :]) / n  # [N, N]
    centred = np.zeros_like(dist)
    for k in (0, 1):
        rows = inverse == k
        for k2 in (0, 1):
            cols = inverse == k2
            block = dist[np.ix_(rows, cols)]
            if k == k2:  # the diagonal (d_jj = 0) is not a pair
                m = block.shape[0]
                row_mean = block.sum(axis=1) / (m - 1)
                grand = block.sum() / (m * (m - 1))
                c = block - row_mean[:, None] - row_mean[None, :] + grand
                np.fill_diagonal(c, 0.0)
            else:
                c = block - block.mean(axis=1, keepdims=True) - block.mean(axis=0, keepdims=True) + block.mean()
            centred[np.ix_(rows, cols)] = c
    return w * centred


def paired_silhouette_test(fa: SilhouetteFit, fb: SilhouetteFit, confidence: float = 0.95, corrected: bool = True) -> dict:
    """Paired test of mean silhouette(a) - mean silhouette(b) on the same prompts: stratified jackknife.

    The per-prompt silhouettes of one model share its class centroids and distances, so they are
    not independent and a t-test over prompts rejects a true null far too often. Here prompt i is
    removed from both models' data at once (:func:`silhouette_fit`), the stratified jackknife
    variance of the N leave-one-out differences gives the standard error, and the interval and
    two-sided p-value are Wald ones with N - 2 degrees of freedom (as the separation Deltas').
    Returns ``{"mean_diff", "se", "t", "ci", "p_value", "cohens_d", "method"}``; ``cohens_d`` is
    the per-prompt d_z, descriptive.
    """
    from fteval.eval.separation import _jackknife_var  # the separation Deltas' variance, same strata

    if not np.array_equal(fa.inverse, fb.inverse):
        raise ValueError("paired silhouettes must be of the same prompts with the same labels, in the same order.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; use 0.95 for 95% intervals.")
    n = fa.inverse.size
    diff = fa.mean - fb.mean
    vj = _jackknife_var(fa.loo_means - fb.loo_means, fa.inverse)
    if corrected and fa.second_order is not None and fb.second_order is not None:
        v2 = float(np.sum((fa.second_order - fb.second_order) ** 2)) / 2.0  # pairs j < l
        vj = max(vj - v2, vj / 2.0)
    se = float(np.sqrt(vj))
    tq = float(sps.t.ppf(0.5 + confidence / 2.0, n - 2))
    if se == 0.0:
        t, p = (0.0, 1.0) if diff == 0.0 else (float("inf"), 0.0)
    else:
        t = diff / se
        p = float(2.0 * sps.t.sf(abs(t), n - 2))
    return {"mean_diff": float(diff), "se": se, "t": float(t), "ci": [diff - tq * se, diff + tq * se],
            "p_value": p, "cohens_d": cohens_d_paired(fa.per_prompt, fb.per_prompt),
            "method": "paired stratified jackknife of the mean silhouette"}
