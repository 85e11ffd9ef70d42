"""torchmetrics states of the test loop: per-layer prompt representations and per-response behaviour.

Both keep every row (``dist_reduce_fx="cat"``) so DDP ranks are gathered before anything is computed,
and both drop the duplicate rows a padding ``DistributedSampler`` adds (by prompt index).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


class RepresentationCollector(Metric):
    """Per-layer prompt representations ``[N, L+1, D]`` with labels and prompt indices (cat-reduced)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("reps", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, reps: Tensor, labels: Tensor, index: Tensor) -> None:
        self.reps.append(reps.float())
        self.labels.append(labels.long())
        self.index.append(index.long())

    def compute(self) -> tuple[Tensor, Tensor, Tensor]:
        """Sorted by prompt index, duplicates (padding of a DistributedSampler) removed."""
        reps, labels, index = dim_zero_cat(self.reps), dim_zero_cat(self.labels), dim_zero_cat(self.index)
        order = torch.argsort(index, stable=True)
        index, reps, labels = index[order], reps[order], labels[order]
        keep = torch.ones_like(index, dtype=torch.bool)
        keep[1:] = index[1:] != index[:-1]
        return reps[keep], labels[keep], index[keep]


class BehaviourCollector(Metric):
    """Per (prompt, variant): refusal class (its position in ``fteval.eval.refusal.detector.MODEL_CLASSES``:
    0 compliance, 1 partial, 2 full) and G-Eval scores (cat-reduced)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("index", "variant", "refusal", "geval", "tokens"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, variant: Tensor, refusal: Tensor, geval: Tensor, tokens: Tensor) -> None:
        self.index.append(index.long())
        self.variant.append(variant.long())
        self.refusal.append(refusal.long())
        self.geval.append(geval.double())
        self.tokens.append(tokens.long())

    def compute(self) -> dict[str, Tensor]:
        if isinstance(self.index, list) and not self.index:  # a list until synced, a tensor after
            return {}
        out = {k: dim_zero_cat(getattr(self, k)) for k in ("index", "variant", "refusal", "geval", "tokens")}
        key = out["variant"] * (int(out["index"].max()) + 1) + out["index"]
        order = torch.argsort(key, stable=True)
        out = {k: v[order] for k, v in out.items()}
        keep = torch.ones_like(key, dtype=torch.bool)
        keep[1:] = key[order][1:] != key[order][:-1]
        return {k: v[keep] for k, v in out.items()}

