"""Input checks of the cluster metrics (:mod:`fteval.eval.metrics`, :mod:`fteval.eval.separation`):
``embeddings`` ``[N, D]`` and ``labels`` ``[N]`` as every score expects them, with one clear error
naming what is wrong otherwise. Re-exported by :mod:`fteval.eval.metrics`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_clusters", "check_embeddings"]


def check_embeddings(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes, dtypes and finiteness; return ``(embeddings float64 [N, D], labels int64 [N])``.

    Raises ``ValueError`` naming the problem and its fix. Class counts are checked later
    (:func:`check_clusters`) because under DDP a single rank may legitimately see one class.
    """
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise ValueError(
            f"embeddings and labels must be torch tensors, got {type(embeddings).__name__} and "
            f"{type(labels).__name__}; wrap them with torch.as_tensor(...)."
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be [N prompts, D hidden], got shape {tuple(embeddings.shape)}; pool "
            "token and layer dimensions first (fteval.eval.pooling.masked_mean / pool_over_layers)."
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be a float tensor, got {embeddings.dtype}; use embeddings.float().")
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor [N], got shape {tuple(labels.shape)}; flatten it.")
    if labels.dtype == torch.bool:
        labels = labels.long()
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"labels must be integers (0 = safe, 1 = unsafe), got {labels.dtype}; convert with labels.long()."
        )
    if embeddings.shape[0] != labels.shape[0]:
        raise ValueError(
            f"embeddings has {embeddings.shape[0]} rows but labels has {labels.shape[0]} entries; "
            "pass exactly one label per prompt, in the same order."
        )
    finite = torch.isfinite(embeddings)
    if not bool(finite.all()):
        bad_rows = (~finite).any(dim=1).nonzero().flatten()
        raise ValueError(
            f"embeddings contain NaN or inf in {bad_rows.numel()} of {embeddings.shape[0]} prompts "
            f"(first rows: {bad_rows[:5].tolist()}); the forward pass overflowed or padded positions "
            "leaked into pooling: run the model in bf16/fp32 instead of fp16 and pool with "
            "fteval.eval.pooling.masked_mean."
        )
    return embeddings.to(torch.float64), labels.long()


def check_clusters(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
    """:func:`check_embeddings` plus cluster checks; return ``(emb [N, D] f64, inverse labels [N] in 0..K-1, K)``.

    Raises ``ValueError`` for fewer than two classes, a class with fewer than two prompts, or
    embeddings that are all identical (every separation index is undefined then).
    """
    embeddings, labels = check_embeddings(embeddings, labels)
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    if classes.numel() < 2:
        what = f"only class {classes.tolist()}" if classes.numel() else "no prompts"
        raise ValueError(
            f"labels contain {what} ({labels.numel()} prompts); separation metrics need prompts of at "
            "least two classes (0 = safe, 1 = unsafe): check the evaluation set's safety_label column "
            "or use a split that holds both."
        )
    small = [(int(c), int(n)) for c, n in zip(classes.tolist(), counts.tolist()) if n < 2]
    if small:
        raise ValueError(
            "every class needs at least 2 prompts, but "
            + ", ".join(f"class {c} has {n}" for c, n in small)
            + "; add prompts of that class to the evaluation set or drop the class."
        )
    if bool((embeddings == embeddings[0]).all()):
        raise ValueError(
            f"all {embeddings.shape[0]} embeddings are identical, so no separation can be measured; "
            "check that pooling reads the hidden states (not a constant such as a padding row)."
        )
    return embeddings, inverse, int(classes.numel())
