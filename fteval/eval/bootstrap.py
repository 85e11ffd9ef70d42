"""Vectorised (paired) percentile bootstrap of the AQI-family scores, as a library function.

``fteval test`` reports closed-form jackknife intervals instead (:mod:`fteval.eval.separation`; percentile
intervals sit above the estimate, docs/statistics.md); ``fteval bench eval`` times this bootstrap.

A resample is a row of multiplicities W [B, N] (how often each prompt was drawn). Every score in
:data:`fteval.eval.metrics.VECTORISED_SCORES` depends on a resample only through per-class weighted
statistics, so for class k (members X_k [n_k, D], original mean mu_k) and a chunk of resamples W_k [b, n_k]:

    n_k = W_k 1,   S_k = W_k (X_k - mu_k),   c_k = mu_k + S_k / n_k,
    SS_k = W_k ||x - mu_k||^2 - ||S_k||^2 / n_k,

one matmul per class and chunk, then :func:`fteval.eval.metrics.scores_from_stats` on the batch
(the same formula code as the point estimate). Centring on mu_k keeps the subtraction in SS_k
free of cancellation. Paired: both models use the same W, i.e. the same resampled prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from fteval.eval.metrics import (
    DEFAULT_LAMBDA,
    VECTORISED_SCORES,
    check_clusters,
    class_stats,
    scores_from_stats,
)

__all__ = [
    "BootstrapResult",
    "PairedBootstrapResult",
    "bootstrap_cis",
    "paired_bootstrap_deltas",
    "resample_indices",
    "resampled_scores",
]

_CHUNK_BYTES = 256 * 2**20  # bound on the float64 temporaries of one chunk of resamples


@dataclass(frozen=True)
class BootstrapResult:
    """Single-model percentile bootstrap of one score.

    ``distribution`` ``[n_resamples]`` float64 holds the resampled scores.
    """

    metric: str
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    seed: int
    stratified: bool
    distribution: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Paired percentile bootstrap of ``delta = score(tuned) - score(base)`` on the same prompts.

    ``p_value`` is two-sided, from the bootstrap distribution of the delta (see
    :func:`paired_bootstrap_deltas`); ``distribution`` ``[n_resamples]`` holds the resampled deltas.
    """

    metric: str
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    estimate_base: float
    estimate_tuned: float
    confidence: float
    n_resamples: int
    seed: int
    stratified: bool
    distribution: np.ndarray = field(repr=False)


def _check_bootstrap_args(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}; 1000 is the usual choice.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}; use 0.95 for 95% intervals.")


def resample_indices(labels: Tensor, n_resamples: int = 1000, seed: int = 0, stratified: bool = True) -> Tensor:
    """Bootstrap resamples as prompt indices ``[n_resamples, N]`` int64 (row b = the prompts of resample b).

    ``stratified=True`` draws, for every class, as many prompts as it has, with replacement and
    from that class only, so each resample keeps the class sizes and both classes; position i of
    a row then holds a prompt of the same class as prompt i. ``stratified=False`` draws N prompts
    from all; rows that leave a class with fewer than 2 prompts are redrawn (reported scores
    need two per class). Deterministic in ``seed`` (CPU ``torch.Generator``).
    """
    _check_bootstrap_args(n_resamples, 0.5)
    labels = torch.as_tensor(labels).detach().cpu()
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_samples = labels.numel()
    gen = torch.Generator().manual_seed(int(seed))
    if stratified:
        out = torch.empty(n_resamples, num_samples, dtype=torch.long)
        for k in range(counts.numel()):
            members = (inverse == k).nonzero().flatten()  # [n_k]
            draws = torch.randint(members.numel(), (n_resamples, members.numel()), generator=gen)
            out[:, members] = members[draws]
        return out
    out = torch.randint(num_samples, (n_resamples, num_samples), generator=gen)
    for _ in range(1000):
        per_class = torch.zeros(n_resamples, counts.numel(), dtype=torch.long)
        per_class.scatter_add_(1, inverse[out], torch.ones_like(out))
        bad = (per_class < 2).any(dim=1).nonzero().flatten()
        if bad.numel() == 0:
            return out
        out[bad] = torch.randint(num_samples, (bad.numel(), num_samples), generator=gen)
    raise ValueError(
        "unstratified resampling keeps leaving a class with fewer than 2 prompts; the classes are too "
        "unbalanced for it: use stratified=True."
    )


def _chunk_size(n_resamples: int, num_samples: int, num_classes: int, dims: Sequence[int]) -> int:
    per_row = 8 * (2 * num_samples + sum(3 * num_classes * d for d in dims))  # bytes of float64 temporaries
    return max(1, min(n_resamples, _CHUNK_BYTES // per_row))


def _weighted_scores(
    embeddings: Tensor, inverse: Tensor, num_classes: int, weights: Tensor, lam: float
) -> dict[str, Tensor]:
    """Scores of a chunk of weighted resamples: ``weights [b, N]`` float64 -> ``{name: [b]}``."""
    counts, centroids, ss_within = [], [], []
    for k in range(num_classes):
        members = (inverse == k).nonzero().flatten()
        x = embeddings[members]  # [n_k, D]
        mu = x.mean(dim=0)  # [D]
        dev = x - mu  # [n_k, D]
        w = weights[:, members]  # [b, n_k]
        n = w.sum(dim=1)  # [b]
        s = w @ dev  # [b, D]
        counts.append(n)
        centroids.append(mu + s / n[:, None])
        ss_within.append(w @ dev.pow(2).sum(dim=1) - s.pow(2).sum(dim=1) / n)
    return scores_from_stats(
        torch.stack(counts, dim=-1), torch.stack(centroids, dim=-2), torch.stack(ss_within, dim=-1), lam=lam
    )


def resampled_scores(
    embeddings: Sequence[Tensor],
    labels: Tensor,
    indices: Tensor,
    metrics: Sequence[str] = VECTORISED_SCORES,
    lam: float = DEFAULT_LAMBDA,
) -> list[dict[str, Tensor]]:
    """Scores of every resample for one or more embedding matrices of the same prompts.

    Args:
        embeddings: sequence of ``[N, D_m]`` float tensors (one per model; same prompts, same order).
        labels: ``[N]`` integer class labels.
        indices: ``[B, N]`` resampled prompt indices (:func:`resample_indices`); every model uses
            the same rows, which is what makes a comparison paired.
        metrics: names from :data:`VECTORISED_SCORES`.
        lam: AQI weight.

    Returns one dict per model, ``{metric: [B] float64}``. Work is chunked over B so the float64
    temporaries stay under ~256 MiB.
    """
    unknown = [m for m in metrics if m not in VECTORISED_SCORES]
    if unknown:
        raise ValueError(
            f"cannot bootstrap {unknown}: the vectorised bootstrap supports {list(VECTORISED_SCORES)} "
            "(Davies-Bouldin and Dunn have no sufficient-statistic form)."
        )
    if len(embeddings) == 0:
        raise ValueError("embeddings must hold at least one [N, D] matrix.")
    checked = []
    for emb in embeddings:
        emb64, inverse, num_classes = check_clusters(emb, labels)  # same labels: same inverse, K
        checked.append(emb64)
    num_samples = checked[0].shape[0]
    if any(e.shape[0] != num_samples for e in checked):
        raise ValueError("every model's embeddings must cover the same prompts (same N, same order).")
    indices = torch.as_tensor(indices)
    if indices.ndim != 2 or indices.shape[1] != num_samples:
        raise ValueError(
            f"indices must be [n_resamples, N={num_samples}], got {tuple(indices.shape)}; build them with "
            "resample_indices(labels, ...)."
        )
    device = checked[0].device
    indices = indices.to(device)
    n_resamples = indices.shape[0]
    chunk = _chunk_size(n_resamples, num_samples, num_classes, [e.shape[1] for e in checked])
    out: list[dict[str, list[Tensor]]] = [{m: [] for m in metrics} for _ in checked]
    for start in range(0, n_resamples, chunk):
        rows = indices[start : start + chunk]  # [b, N]
        weights = torch.zeros(rows.shape[0], num_samples, dtype=torch.float64, device=device)
        weights.scatter_add_(1, rows, torch.ones_like(rows, dtype=torch.float64))  # multiplicities
        for model_out, emb in zip(out, checked):
            scores = _weighted_scores(emb, inverse, num_classes, weights, lam)
            for m in metrics:
                model_out[m].append(scores[m])
    return [{m: torch.cat(v[m]).cpu() for m in metrics} for v in out]


def _percentile_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _setup(confidence: float, n_resamples: int, seed: int, stratified: bool) -> dict:
    """The settings every result records."""
    return {"confidence": confidence, "n_resamples": int(n_resamples), "seed": int(seed), "stratified": bool(stratified)}


def _point_scores(embeddings: Tensor, labels: Tensor, lam: float) -> dict[str, Tensor]:
    emb64, inverse, num_classes = check_clusters(embeddings, labels)
    return scores_from_stats(*class_stats(emb64, inverse, num_classes), lam=lam)


def bootstrap_cis(
    embeddings: Tensor,
    labels: Tensor,
    n_resamples: int = 1000,
    seed: int = 0,
    stratified: bool = True,
    metrics: Sequence[str] = ("aqi", "aqi_bounded", "xbi", "chi"),
    confidence: float = 0.95,
    lam: float = DEFAULT_LAMBDA,
) -> dict[str, BootstrapResult]:
    """Percentile bootstrap CIs of several scores of one model, from the same resamples.

    Args:
        embeddings: ``[N, D]`` float, one vector per prompt.
        labels: ``[N]`` integer labels (0 = safe, 1 = unsafe).
        n_resamples, seed, stratified: see :func:`resample_indices`.
        metrics: names from :data:`VECTORISED_SCORES`.
        confidence: interval coverage (0.95 -> 2.5th and 97.5th percentiles).
        lam: AQI weight.
    """
    _check_bootstrap_args(n_resamples, confidence)
    point = _point_scores(embeddings, labels, lam)
    indices = resample_indices(labels, n_resamples, seed, stratified)
    (dists,) = resampled_scores([embeddings], labels, indices, metrics, lam)
    setup = _setup(confidence, n_resamples, seed, stratified)
    results = {}
    for m in metrics:
        values = dists[m].numpy()
        low, high = _percentile_ci(values, confidence)
        results[m] = BootstrapResult(metric=m, estimate=float(point[m]), ci_low=low, ci_high=high, distribution=values,
                                     **setup)
    return results


def _bootstrap_p_value(deltas: np.ndarray) -> float:
    """Two-sided p of H0: delta = 0 from the bootstrap distribution of the delta.

    p = min(1, 2 min(1 + #{delta_b <= 0}, 1 + #{delta_b >= 0}) / (B + 1)): twice the smaller tail
    mass beyond zero, the p-value whose p < alpha matches 0 lying outside the percentile
    interval of level 1 - alpha. The +1 keeps p >= 2 / (B + 1) (about 0.002 for B = 1000):
    a finite bootstrap cannot support a smaller p.
    """
    n = deltas.size
    below = 1 + int(np.sum(deltas <= 0.0))
    above = 1 + int(np.sum(deltas >= 0.0))
    return float(min(1.0, 2.0 * min(below, above) / (n + 1)))


def paired_bootstrap_deltas(
    emb_base: Tensor,
    emb_tuned: Tensor,
    labels: Tensor,
    n_resamples: int = 1000,
    seed: int = 0,
    stratified: bool = True,
    metrics: Sequence[str] = ("aqi", "aqi_bounded", "xbi", "chi"),
    confidence: float = 0.95,
    lam: float = DEFAULT_LAMBDA,
) -> dict[str, PairedBootstrapResult]:
    """Paired bootstrap of ``score(tuned) - score(base)`` for several scores, from the same resamples.

    Args:
        emb_base: ``[N, D]`` baseline embeddings (adapter off).
        emb_tuned: ``[N, D']`` tuned embeddings of the same N prompts in the same order.
        labels: ``[N]`` integer labels.
        n_resamples, seed, stratified: see :func:`resample_indices`; both models get the same
            resampled prompt indices in every resample (paired).
        metrics: names from :data:`VECTORISED_SCORES`. For ``xbi`` lower is better, so a
            negative delta is an improvement there.
        confidence: CI level (percentile method).
        lam: AQI weight.

    The p-value is two-sided, from the bootstrap distribution of the paired delta
    (:func:`_bootstrap_p_value`).
    """
    _check_bootstrap_args(n_resamples, confidence)
    if emb_base.shape[0] != emb_tuned.shape[0]:
        raise ValueError(
            f"emb_base has {emb_base.shape[0]} prompts but emb_tuned has {emb_tuned.shape[0]}; a paired "
            "comparison needs both models' embeddings of the same prompts in the same order."
        )
    point_base = _point_scores(emb_base, labels, lam)
    point_tuned = _point_scores(emb_tuned, labels, lam)
    indices = resample_indices(labels, n_resamples, seed, stratified)
    dist_base, dist_tuned = resampled_scores([emb_base, emb_tuned], labels, indices, metrics, lam)
    setup = _setup(confidence, n_resamples, seed, stratified)
    results = {}
    for m in metrics:
        deltas = (dist_tuned[m] - dist_base[m]).numpy()
        low, high = _percentile_ci(deltas, confidence)
        results[m] = PairedBootstrapResult(
            metric=m, delta=float(point_tuned[m] - point_base[m]), ci_low=low, ci_high=high,
            p_value=_bootstrap_p_value(deltas), estimate_base=float(point_base[m]),
            estimate_tuned=float(point_tuned[m]), distribution=deltas, **setup)
    return results
