"""Capture of GRIT's rank-space statistics during forward and backward: which tokens count, and how
each layer's u and v reach its :class:`~fteval.grit.stats.FactorGroup` row.

Per micro-batch (:meth:`StatisticsCapture.begin_micro_batch`): the real-token mask, the AMP loss
scale, the once-per-micro-batch flags re-armed. In eager mode a GRIT layer's forward calls
:meth:`StatisticsCapture.record` with u = A x and autograd keeps u's gradient (``retain_grad``,
a hook that runs in C++); inside compiled blocks the backward delivers (u, du) through the
layer's leaf slot or :meth:`StatisticsCapture.record_pair`. Nothing is computed per layer there:
the tensors wait until :meth:`StatisticsCapture.flush` (before the optimizer step) adds them with
one batched Gram matmul per group of same-shaped tensors. The gradient reaching u is
``scaling * v * loss_scale`` (v = B^T dL/dy), so its Gram matrix is divided by
``(scaling * loss_scale)^2``.

Batching matters at launch-bound shapes (batch 1, checkpointing), where a per-layer form's few small
kernels per layer and side would dominate GRIT's overhead; ``retain_grad`` (a hook that runs in C++)
records for about half the host time of a Python tensor hook (BENCHMARKS.md, "GRIT host-side costs").
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fteval.grit.layer import GritLoraLinear
from fteval.grit.stats import FactorGroup

__all__ = ["STATISTICS_TOKENS", "StatisticsCapture", "token_mask_from_batch"]

STATISTICS_TOKENS = ("loss", "all", "every")


def token_mask_from_batch(batch: Any, tokens: str = "loss") -> torch.Tensor | None:
    """Mask ``[batch, seq]`` (bool) of the positions whose statistics count, or None (all count).

    ``tokens="loss"``: HF causal-LM convention, ``labels`` equal ``input_ids`` with -100 where
    no loss is taken, and position t's output predicts ``labels[t + 1]``; so position t
    counts when ``labels[:, t + 1] != -100`` (the last position predicts nothing). Without
    labels, ``attention_mask`` marks the real tokens. ``tokens="all"``: every non-padding
    position (``attention_mask``), prompt included. ``tokens="every"``: None, every position
    including padding, as the GRIT reference's hooks see them. Without either tensor, None.
    """
    if tokens not in STATISTICS_TOKENS:
        raise ValueError(f"statistics_tokens must be one of {STATISTICS_TOKENS}, got {tokens!r}.")
    if tokens == "every" or not isinstance(batch, Mapping):
        return None
    labels = batch.get("labels")
    if tokens == "loss" and isinstance(labels, torch.Tensor) and labels.dim() == 2:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    attention = batch.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        return attention.bool()
    return None


class StatisticsCapture:
    """Receives the GRIT layers' rank-space tensors and adds them to their groups' pending sums.

    ``warn``: how a mismatched token mask is reported (``warnings.warn``; a distributed
    caller passes a rank-zero variant). ``host_seconds``: host time spent recording
    since the caller last reset it.
    """

    def __init__(self, warn: Callable[[str], Any] = warnings.warn) -> None:
        self.warn = warn
        self.host_seconds = 0.0
        self._attached: list[GritLoraLinear] = []
        self._row_of: dict[int, tuple[FactorGroup, int]] = {}  # id(layer) -> (group, row)
        self._mask: torch.Tensor | None = None  # [batch, seq] bool for the current micro-batch
        self._mask_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (0/1 floats, count)
        self._mask_warned = False
        self._grad_scale = 1.0  # AMP loss scale of the current micro-batch
        # tensors waiting for flush(), per batched Gram product: key -> (group, side, mask, count, rows, tensors,
        # scales); side None holds the (u, du) pairs of compiled layers, flushed first
        self._deferred: dict[tuple, tuple] = {}
        self._deferred_pairs: dict[tuple, tuple] = {}
        self._awaiting_grad: list[tuple] = []  # (group, row, mask, count, scale, u) whose u.grad flush() reads
        self._leaf_layers: list[tuple[GritLoraLinear, FactorGroup, int]] = []  # GRIT layers inside compiled blocks
        self._leaf_lead: tuple | None = None  # (token dims, dtype) the leaves are made for
        self._leaf_dims: tuple | None = None  # (lead, grad_scale) of the micro-batch that fills them
        self._scale_cache: dict[tuple, torch.Tensor] = {}  # per-layer S_g scales -> [layers, 2, 1, 1] on the device
        self._index_cache: dict[tuple, torch.Tensor] = {}  # (group, rows) -> row-index tensor on the device

    # ------------------------------------------------------------------ attach / detach
    def attach(self, groups: Sequence[FactorGroup]) -> None:
        """Make every layer of ``groups`` report here (``layer.capture``); forgets what was waiting."""
        self.detach()
        self._row_of = {id(layer): (group, i) for group in groups for i, layer in enumerate(group.layers)}
        self._deferred, self._deferred_pairs, self._awaiting_grad = {}, {}, []
        self._scale_cache, self._index_cache = {}, {}
        self._attached = [layer for group in groups for layer in group.layers]
        for layer in self._attached:
            layer.capture = self
        self._leaf_layers = [
            (layer, group, i) for group in groups for i, layer in enumerate(group.layers) if layer.in_compiled_block
        ]
        self._leaf_lead = self._leaf_dims = None

    def detach(self) -> None:
        """Stop recording statistics (they stay on the layers)."""
        for layer in self._attached:
            if layer.capture is self:
                layer.capture = None
                layer.kfac_leaf = None
        self._attached = []
        self._leaf_layers, self._leaf_lead, self._leaf_dims = [], None, None

    # ------------------------------------------------------------------ per micro-batch
    def begin_micro_batch(
        self,
        token_mask: torch.Tensor | None,
        grad_scale: float = 1.0,
        token_shape: Sequence[int] | None = None,
        slot_dtype: torch.dtype = torch.float32,
    ) -> None:
        """Start a micro-batch: its real-token mask ``[batch, seq]`` and AMP loss scale; re-arm the layers.

        ``token_shape``: the micro-batch's token dims (``input_ids.shape``; default: the mask's
        shape). GRIT layers inside compiled blocks need it to hand their statistics over
        without Python per layer; without it they use the slower fallback op. ``slot_dtype``:
        the dtype they hand u and du over in (the training precision's); the statistics are
        summed in fp32 either way.
        """
        self._collect_grads()  # the previous micro-batch's backward has run
        self._mask = None if token_mask is None else token_mask.bool()
        self._mask_on = {}
        self._grad_scale = float(grad_scale)
        for layer in self._attached:
            if layer.stats is not None:
                layer.stats.counted = False
        if self._leaf_layers:
            if token_shape is None and token_mask is not None:
                token_shape = token_mask.shape
            lead = None if token_shape is None else tuple(int(d) for d in token_shape)
            self._prepare_leaves(lead, slot_dtype)
            self._leaf_dims = None if lead is None else (lead, self._grad_scale)

    def record(self, layer: GritLoraLinear, u: torch.Tensor, lead: tuple) -> None:
        """u ``[N, r]`` from ``layer``'s forward (N = prod(lead) tokens); asks autograd to keep its gradient,
        which :meth:`flush` reads after backward (or the next micro-batch's start)."""
        t0 = time.perf_counter()
        group, row, mask, count, scale = self._target(layer, tuple(lead), u.device)
        self._defer(group, row, 0, u.detach(), mask, count, 1.0)
        if u.requires_grad:  # eager; compiled GRIT layers call record_pair
            u.retain_grad()
            self._awaiting_grad.append((group, row, mask, count, scale, u))
        self.host_seconds += time.perf_counter() - t0

    def record_pair(self, layer: GritLoraLinear, u: torch.Tensor, du: torch.Tensor, lead: tuple) -> None:
        """u and its gradient ``[N, r]`` at once (compiled GRIT layers report both from their backward)."""
        t0 = time.perf_counter()
        group, row, mask, count, scale = self._target(layer, tuple(lead), u.device)
        self._defer(group, row, 0, u.detach(), mask, count, 1.0)
        self._defer(group, row, 1, du.detach(), mask, count, scale)
        self.host_seconds += time.perf_counter() - t0

    def _target(self, layer: GritLoraLinear, lead: tuple, device: torch.device) -> tuple:
        """(group, row, mask, mask count, S_g scale) for a tensor of ``layer`` with token dims ``lead``."""
        group, row = self._row_of[id(layer)]
        mask, count = self._mask_for(lead, device)
        return group, row, mask, count, 1.0 / (layer.scaling * self._grad_scale) ** 2

    def _mask_for(self, lead: tuple, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(0/1 float weights of shape ``lead`` = the activations' token dims, their count) on ``device``,
        or (None, None) without a mask."""
        mask = self._mask
        if mask is None:
            return None, None
        if lead != tuple(mask.shape):
            if not self._mask_warned:
                self.warn(
                    f"StatisticsCapture: token mask of shape {tuple(mask.shape)} does not match GRIT activations "
                    f"{lead}; statistics use all tokens for such layers."
                )
                self._mask_warned = True
            return None, None
        cached = self._mask_on.get(device)
        if cached is None:
            m = mask.to(device, non_blocking=True)
            cached = self._mask_on[device] = (m.float(), m.sum(dtype=torch.int64))
        return cached

    def _defer(self, group: FactorGroup, row: int, side: int, t: torch.Tensor, mask: Any, count: Any,
               scale: float) -> None:
        """Keep a layer's rank-space tensor until :meth:`flush` (no kernels launched per layer here)."""
        key = (id(group), side, id(mask) if mask is not None else None, tuple(t.shape), t.dtype)
        entry = self._deferred.get(key)
        if entry is None:
            entry = self._deferred[key] = (group, side, mask, count, [], [], [])
        entry[4].append(row)
        entry[5].append(t)
        entry[6].append(scale)

    # ------------------------------------------------------------------ compiled layers' slots
    def _prepare_leaves(self, lead: tuple | None, dtype: torch.dtype) -> None:
        """Give every GRIT layer inside a compiled block a ``[2, tokens, r]`` leaf for this micro-batch.

        The leaves have zero strides (no memory) and are kept while the token count and dtype
        stay the same; the backward writes (u, du) into their ``.grad`` in ``dtype``. ``lead``
        None (token count unknown): no leaves, and the layers fall back to the
        ``fteval::grit_record`` op (:mod:`fteval.grit.layer`).
        """
        if not self._leaf_layers or (lead, dtype) == self._leaf_lead:
            return
        self._leaf_lead = (lead, dtype)
        n = math.prod(lead) if lead is not None else 0
        for layer, group, _ in self._leaf_layers:
            layer.kfac_leaf = (
                None
                if lead is None
                else torch.empty_strided((2, n, group.rank), (0, 0, 0), dtype=dtype, device=group.device)
                .requires_grad_()
            )

    def _collect_grads(self) -> None:
        """The v side from the gradients autograd kept on the recorded u, and the compiled layers' (u, du).

        Also run at each micro-batch start, so no u (and the graph it holds) outlives its
        micro-batch; a u whose backward never ran contributes no v-side statistics.
        """
        awaiting, self._awaiting_grad = self._awaiting_grad, []
        t0 = time.perf_counter()
        for group, row, mask, count, scale, u in awaiting:
            if u.grad is not None:
                self._defer(group, row, 1, u.grad.detach(), mask, count, scale)
        if self._leaf_layers and self._leaf_dims is not None:
            lead, grad_scale = self._leaf_dims  # of the micro-batch whose backward filled the leaves
            for layer, group, row in self._leaf_layers:
                leaf = layer.kfac_leaf
                if leaf is None or leaf.grad is None:
                    continue
                pair = leaf.grad  # [2, N, r]: u and du
                leaf.grad = None
                mask, count = self._mask_for(lead, group.device)  # still that micro-batch's mask (cached per device)
                # both sides as one tensor (indexing pair[0], pair[1] would be 448 more ops per step at 224 layers)
                key = (id(group), id(mask) if mask is not None else None, tuple(pair.shape))
                entry = self._deferred_pairs.get(key)
                if entry is None:
                    entry = self._deferred_pairs[key] = (group, None, mask, count, [], [], [])
                entry[4].append(row)
                entry[5].append(pair)
                entry[6].append(1.0 / (layer.scaling * grad_scale) ** 2)
        self.host_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ into the pending sums
    def flush(self) -> None:
        """Add everything recorded to the groups' pending sums: one batched Gram matmul per shape group."""
        self._collect_grads()
        pairs, self._deferred_pairs = self._deferred_pairs, {}
        single, self._deferred = self._deferred, {}
        for group, side, mask, count, rows, tensors, scales in (*pairs.values(), *single.values()):
            X = torch.stack(tensors)  # [layers, 2, tokens, r] (pairs) or [layers, *lead, r]
            if side is not None:
                X = X.reshape(len(tensors), -1, group.rank)  # [layers, tokens, r]
            group.accumulate(self._rows_index(group, rows), side, X, mask, count, self._scales(side, scales, X))

    def _scales(self, side: int | None, scales: list[float], X: torch.Tensor) -> float | torch.Tensor:
        """What the Gram matrices of one batch are multiplied by: a number for one side, else per layer and side.

        No host-to-device copies block here: a blocking copy synchronises the stream, which at
        launch-bound shapes exposes all of the step's remaining host work.
        """
        if side is not None:
            if all(sc == scales[0] for sc in scales):  # the usual case: one LoRA scaling, one loss scale
                return scales[0]
            return torch.tensor(scales, dtype=torch.float32).to(X.device, non_blocking=True).view(-1, 1, 1)
        key = tuple(scales)
        side_scale = self._scale_cache.get(key)
        if side_scale is None:  # [layers, 2, 1, 1]: 1 for S_a, 1/(scaling * loss scale)^2 for S_g
            if len(self._scale_cache) > 64:
                self._scale_cache.clear()
            side_scale = torch.tensor([[1.0, sc] for sc in scales], dtype=torch.float32).view(-1, 2, 1, 1)
            side_scale = self._scale_cache[key] = side_scale.to(X.device)
        return side_scale

    def _rows_index(self, group: FactorGroup, rows: list[int]) -> torch.Tensor:
        """The row indices as a device tensor, made once per (group, rows): creating it is a host-to-device copy."""
        key = (id(group), tuple(rows))
        index = self._index_cache.get(key)
        if index is None:
            index = self._index_cache[key] = torch.tensor(rows, device=group.device)
        return index
