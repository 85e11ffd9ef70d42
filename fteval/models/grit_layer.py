"""GRIT's LoRA layer, its rank-space K-FAC statistics, injection and PEFT-format export.

GRIT (LoRA + K-FAC natural-gradient preconditioning + Fisher-guided reprojection) needs
the activations and output gradients of the LoRA rank space, which peft's LoRA layer does
not expose in a form hooks can count once per micro-batch; hence a small layer of our own
(peft's conventions: A kaiming-uniform(a=sqrt(5)), B zeros, scaling alpha/r or
alpha/sqrt(r)). Everything it saves is a standard peft LoRA adapter folder, so peft,
vLLM and merge tools load a GRIT adapter exactly like a QLoRA one.

Equations (docs/grit.md, "Equations"), per token, layer y = W x + s B A x:
u = A x (r), g = dL/dy (d_out), v = B^T g (r); S_a = E[u u^T], S_g = E[v v^T] (r x r).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "GritLoraLinear",
    "adapter_rank",
    "RankSpaceStats",
    "energy_rank",
    "export_grit_adapter",
    "fold_coefficients",
    "grit_layers",
    "inject_grit_layers",
    "save_kfac_artifacts",
]


def _linear4bit_type() -> type | None:
    """bitsandbytes' ``Linear4bit`` class, or None where bitsandbytes does not import."""
    try:
        import bitsandbytes as bnb
    except Exception:  # pragma: no cover - bitsandbytes is a dependency, but may fail on exotic hosts
        return None
    return bnb.nn.Linear4bit


def _is_supported_linear(module: nn.Module) -> bool:
    l4 = _linear4bit_type()
    return isinstance(module, nn.Linear) or (l4 is not None and isinstance(module, l4))


class GritLoraLinear(nn.Module):
    """``base(x) + scaling * B(A(dropout(x)))`` around a frozen ``nn.Linear`` or bnb ``Linear4bit``.

    Shapes: x ``[..., in_features]`` -> ``[..., out_features]``; ``lora_A.weight`` ``[r, in]``,
    ``lora_B.weight`` ``[out, r]``. The adapter weights are stored in ``adapter_dtype`` (fp32
    by default). Without autocast the branch computes in that dtype; under AMP it computes
    in the autocast dtype like peft's LoRA layer (an fp32 branch kept an fp32 copy of every
    adapted layer's input and cost GRIT 30-37% step time against QLoRA on an H200 at
    Llama-3-8B shape). The K-FAC hooks accumulate u = A x in fp32 either way; the sum is
    cast back to the base output's dtype.

    ``adapter_enabled = False`` makes the layer exactly its base layer (the paired
    baseline pass). ``stats`` holds a :class:`RankSpaceStats` once the K-FAC callback has
    attached, else None.

    The branch is written out with plain tensor ops (``x A^T``, then ``addmm`` fusing the
    residual add into the second matmul) so the forward can hand u = A x to ``recorder``
    (the K-FAC callback) directly, which keeps u's gradient (``retain_grad``) for v;
    no module hooks, no Python autograd Function in eager mode (both cost more host time per
    layer than the kernels they launch at small batches; BENCHMARKS.md). Inside a
    ``torch.compile``d block, where hooks cannot be registered, u goes through ``_GritTap``
    instead (see the comment above it). The LoRA scaling is applied to B (fused into its
    cast), not to u. ``lora_A``/``lora_B`` stay
    ``nn.Linear`` modules for their parameters and peft-compatible names, but forward does
    not call them, so hooks registered on them do not fire.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if not _is_supported_linear(base_layer):
            raise ValueError(
                f"GritLoraLinear wraps nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}; "
                "choose target_modules that name linear layers."
            )
        _check_hparams(r, alpha, dropout)
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self.r = int(r)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # peft's default LoRA init
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout: nn.Module = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)  # forward calls F.dropout directly (no module call per layer)
        self.adapter_enabled = True
        self.stats: RankSpaceStats | None = None
        self.recorder: Any = None  # set by the K-FAC callback: its begin(layer) receives u and hooks v
        # inside a compiled block: a [2, tokens, r] leaf the callback sizes per micro-batch, whose
        # .grad receives (u, du) from the backward (see _GritLeafTap); None in eager mode
        self.kfac_leaf: torch.Tensor | None = None
        self.in_compiled_block = False  # set by fteval.models.base.compile_blocks
        _ALL_LAYERS.add(self)

    # HF code sometimes reads `proj.weight` / `proj.bias` (dtype and device checks): forward to the base.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # [..., out]
        if not self.adapter_enabled:
            return result
        A, B = self.lora_A.weight, self.lora_B.weight  # [r, in], [out, r]
        if torch.is_autocast_enabled(x.device.type):
            # Under AMP the adapter matmuls run in the autocast dtype (bf16), as peft's LoRA layer does;
            # the fp32 master weights and the fp32 K-FAC statistics are unaffected.
            dtype = torch.get_autocast_dtype(x.device.type)
        else:
            dtype = A.dtype
        p = self.dropout_p
        xd = torch.nn.functional.dropout(x, p, True) if p > 0.0 and self.training else x
        x2 = xd.reshape(-1, self.in_features).to(dtype)  # [N, in]
        u = x2 @ A.to(dtype).t()  # [N, r]
        if self.recorder is not None and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # inside a compiled graph: u and du reach the callback from the backward, no graph break
                leaf = self.kfac_leaf
                if leaf is not None and leaf.shape[1] == u.shape[0]:
                    u = _GritLeafTap.apply(u, leaf)
                else:  # the callback could not size a slot for this micro-batch: the opaque hand-over op
                    u = _GritTap.apply(u.view(*x.shape[:-1], self.r), self.lora_A.weight).view(-1, self.r)
            else:
                _record(self, u, x.shape[:-1])
        # The scaling goes into B's cast (one fused kernel when compiled) rather than a multiply of u
        # (a separate kernel per layer in forward and in backward). The gradient reaching u is
        # still scaling * B^T dL/dy, which the K-FAC callback divides out.
        Bs = (B * self.scaling).to(dtype)  # [out, r]
        r2 = result.reshape(-1, self.out_features)  # [N, out]
        if r2.dtype == u.dtype:
            out = torch.addmm(r2, u, Bs.t())  # the residual add fused into the matmul
        else:
            out = r2 + (u @ Bs.t()).to(r2.dtype)
        return out.view(result.shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}, use_rslora={self.use_rslora}"
        )


def _record(layer: GritLoraLinear, u: torch.Tensor, lead: tuple) -> None:
    """Hand u to the K-FAC callback once per micro-batch (gradient checkpointing re-runs forward);
    the callback hooks u for v."""
    st = layer.stats
    if st is not None and not st.counted:
        st.counted = True
        layer.recorder.begin(layer).record(u, lead, layer.scaling)


# ---------------------------------------------------------------------------------------------
# The same hand-over inside torch.compile'd blocks (AdapterModule's compile_blocks).
#
# Preferred path: u passes through ``_GritLeafTap`` (identity in forward, a view, no copy) together
# with ``layer.kfac_leaf``, a [2, tokens, r] leaf tensor with zero strides (no storage) that the
# K-FAC callback sizes at each micro-batch start. The tap's backward returns ``stack([u, du])`` as
# the leaf's "gradient": one fused kernel inside the compiled backward, and autograd's C++
# AccumulateGrad stores it in ``leaf.grad`` without a copy. The callback reads every layer's
# ``leaf.grad`` after backward and folds them with its batched Gram matmuls. No Python runs per layer
# during the step. On the H200 (R10, batch 1 x 1024 with checkpointing) the opaque op below cost ~12 ms
# of host time per step in the op itself plus three device copies per layer (u, du, the returned du).
#
# Fallback, for micro-batches whose token count the callback cannot know in advance (no labels,
# attention mask or input_ids in the batch):
#
# A compiled graph cannot hold the callback's Python (it keeps u and registers a hook on it). Leaving
# the graph at every adapted layer (torch.compiler.disable) cut a block into 8 graphs and made GRIT
# 2.9x slower than eager on the CPU stand-in. Instead the forward passes u through ``_GritTap``, an
# autograd Function the compiler traces (identity; it saves u), and its backward calls one opaque
# op, ``fteval::grit_record(u, du, lora_A)``, which hands both u and du to the callback: one Python
# call per layer per backward, none in forward, so gradient checkpointing's recompute records
# nothing and needs no once-per-micro-batch flag. The op finds its layer from the lora_A weight
# (its storage address: an int argument would be a constant baked into the graph, one recompile
# per layer) and gives the callback copies: a compiled graph reuses its buffers after their last use.
# The op is registered with the low-level torch.library API (no Python autograd wrapper: it only
# ever runs inside backward); measured on the CPU stand-in, torch.library.custom_op's wrapper
# cost ~50 us per call.
# ---------------------------------------------------------------------------------------------

_LAYER_BY_WEIGHT: "weakref.WeakValueDictionary[int, GritLoraLinear]" = weakref.WeakValueDictionary()
_ALL_LAYERS: "weakref.WeakSet[GritLoraLinear]" = weakref.WeakSet()


def _layer_of(lora_A: torch.Tensor) -> GritLoraLinear:
    ptr = lora_A.data_ptr()
    layer = _LAYER_BY_WEIGHT.get(ptr)
    if layer is None or layer.lora_A.weight.data_ptr() != ptr:  # new layers, or weights moved: re-index
        _LAYER_BY_WEIGHT.clear()
        _LAYER_BY_WEIGHT.update({m.lora_A.weight.data_ptr(): m for m in _ALL_LAYERS})
        layer = _LAYER_BY_WEIGHT.get(ptr)
        if layer is None:
            raise RuntimeError("grit_record: no GRIT layer owns this lora_A weight (was it replaced after compiling?)")
    return layer


def _grit_record(u: torch.Tensor, grad: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
    """Backward of a compiled GRIT layer: u and du ``[..., r]`` to the K-FAC callback; returns du (a copy)."""
    layer = _layer_of(lora_A)
    if layer.recorder is not None and layer.stats is not None:
        layer.recorder.begin(layer).record_pair(u.clone(), grad.clone(), tuple(u.shape[:-1]), layer.scaling)
    return grad.clone()


if not hasattr(torch.ops.fteval, "grit_record"):  # once per process (re-imports keep the first registration)
    _LIB = torch.library.Library("fteval", "DEF")
    _LIB.define("grit_record(Tensor u, Tensor grad, Tensor lora_A) -> Tensor")
    _LIB.impl("grit_record", _grit_record, "CompositeExplicitAutograd")
    torch.library.register_fake("fteval::grit_record", lambda u, grad, lora_A: torch.empty_like(grad), lib=_LIB)


class _GritLeafTap(torch.autograd.Function):
    """Identity on u ``[N, r]`` whose backward writes ``stack([u, du])`` into ``leaf.grad``.

    ``leaf`` is ``[2, N, r]`` with zero strides and ``requires_grad``: a slot, never read. The
    pair takes the slot's dtype (the callback picks the training precision's: bf16 under
    bf16-mixed, where u and du are bf16 already, so nothing is lost and half the memory is held).
    Gradient checkpointing re-runs the forward (nothing happens there); the backward runs once.
    """

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        ctx.slot_dtype = leaf.dtype
        return u.view_as(u)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        (u,) = ctx.saved_tensors
        return grad, torch.stack([u.to(ctx.slot_dtype), grad.to(ctx.slot_dtype)])


class _GritTap(torch.autograd.Function):
    """Identity on u ``[..., r]`` whose backward reports (u, du) through ``fteval::grit_record``."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, lora_A: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, lora_A)
        return u.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        u, lora_A = ctx.saved_tensors
        return torch.ops.fteval.grit_record(u, grad, lora_A), None


def _check_hparams(r: Any, alpha: Any, dropout: Any) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}.")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


def fold_coefficients(n: int, cnt: int, ema: bool, ema_decay: float) -> tuple[float, float]:
    """(keep, add) with ``S <- keep * S + add * pending_sum`` for one factor and one optimizer step.

    Token-weighted running mean while ``ema`` is False: keep = n/(n+cnt), add = 1/(n+cnt);
    EMA after: keep = beta, add = (1-beta)/cnt. No tokens: (1, 0).
    """
    if cnt <= 0:
        return 1.0, 0.0
    if ema:
        return ema_decay, (1.0 - ema_decay) / cnt
    return n / (n + cnt), 1.0 / (n + cnt)


class RankSpaceStats:
    """Rank-space K-FAC factors of one :class:`GritLoraLinear`, fp32, on the layer's device.

    ``S_a = E[u u^T]`` with ``u = A dropout(x)`` and ``S_g = E[v v^T]`` with ``v = B^T g``,
    ``g = dL/dy`` of the layer output; both ``[r, r]``, averaged over real (unmasked)
    tokens. The gradient reaching u = A x is ``scaling * v`` (times the AMP loss scale): the
    K-FAC callback divides both out before :meth:`add_g`, so S_g is in units of (dL/dy)^2
    whatever alpha, r or the grad scaler are.

    The layers add per micro-batch into pending sums (:meth:`add_a`, :meth:`add_g`); once per
    optimizer step the sums are folded (:meth:`fold`, or the K-FAC callback's batched
    equivalent): a token-weighted running mean until that side is first used (``ema_a``/
    ``ema_g``, set by the K-FAC callback at its first refresh), then
    ``S <- beta S + (1 - beta) mean(step)``. ``n_a``/``n_g`` count folded tokens.
    ``counted`` is the once-per-micro-batch flag (gradient checkpointing re-runs forward).

    Storage: ``factors`` ``[2, r, r]`` (S_a, S_g), ``pending`` ``[2, r, r]`` (sums this
    step), ``counts`` ``[2]`` int64 (tokens this step) and ``tokens`` ``[2]`` float64 (folded
    tokens, read as ``n_a``/``n_g``; on the device, so folding needs no host sync). The
    K-FAC callback passes views into buffers shared by all layers (``storage=``), so its
    per-step work is a few batched operations instead of several per layer.
    """

    def __init__(
        self,
        rank: int,
        device: torch.device | str,
        ema_decay: float = 0.95,
        storage: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.rank = int(rank)
        self.ema_decay = float(ema_decay)
        if storage is None:
            storage = (
                torch.zeros(2, self.rank, self.rank, dtype=torch.float32, device=device),
                torch.zeros(2, self.rank, self.rank, dtype=torch.float32, device=device),
                torch.zeros(2, dtype=torch.int64, device=device),
                torch.zeros(2, dtype=torch.float64, device=device),
            )
        self.factors, self.pending, self.counts, self.tokens = storage
        if self.factors.shape != (2, self.rank, self.rank) or self.counts.shape != (2,) or self.tokens.shape != (2,):
            raise ValueError(
                f"RankSpaceStats storage must be [2, {rank}, {rank}] x2, [2] and [2], got {tuple(self.factors.shape)}."
            )
        self.ema_a = False
        self.ema_g = False
        self.counted = False

    # views: S_a/S_g [r, r] folded factors, sum_a/sum_g [r, r] pending sums, cnt_a/cnt_g [] pending counts
    S_a = property(lambda self: self.factors[0], lambda self, v: self.factors[0].copy_(v))
    S_g = property(lambda self: self.factors[1], lambda self, v: self.factors[1].copy_(v))
    sum_a = property(lambda self: self.pending[0])
    sum_g = property(lambda self: self.pending[1])
    cnt_a = property(lambda self: self.counts[0])
    cnt_g = property(lambda self: self.counts[1])
    # folded real tokens per side (reading them synchronises with the device)
    n_a = property(lambda self: int(self.tokens[0]), lambda self, v: self.tokens[0].fill_(float(v)))
    n_g = property(lambda self: int(self.tokens[1]), lambda self, v: self.tokens[1].fill_(float(v)))

    @property
    def device(self) -> torch.device:
        return self.factors.device

    def _add(self, side: int, t: torch.Tensor, mask: torch.Tensor | None, count: Any) -> None:
        flat = t.reshape(-1, t.shape[-1]).float()  # [tokens, r]
        if mask is None:
            self.pending[side] += flat.T @ flat
            self.counts[side] += flat.shape[0]
            return
        m = mask.reshape(-1)
        weighted = flat * m.to(flat.dtype)[:, None]  # masked rows zeroed, no host sync
        self.pending[side] += weighted.T @ flat
        self.counts[side] += m.sum(dtype=torch.int64) if count is None else count

    def add_a(self, u: torch.Tensor, mask: torch.Tensor | None = None, count: Any = None) -> None:
        """Add u ``[..., r]`` over real tokens to the pending input-side sum.

        ``mask`` ``u.shape[:-1]``: bool, or 0/1 floats; ``count``: its number of ones if
        already known (int or 0-dim tensor), to save a reduction per layer.
        """
        self._add(0, u, mask, count)

    def add_g(self, v: torch.Tensor, mask: torch.Tensor | None = None, count: Any = None) -> None:
        """Add v = B^T dL/dy ``[..., r]`` (scaling and loss scale already divided out); as :meth:`add_a`."""
        self._add(1, v, mask, count)

    def fold(self) -> None:
        """Merge the pending sums into S_a/S_g and clear them (one layer; a side with non-finite sums is dropped)."""
        cnts = self.counts.tolist()
        finite = torch.isfinite(self.pending).flatten(1).all(1).tolist()
        for side, (name, cnt, ok) in enumerate(zip("ag", cnts, finite)):
            cnt = cnt if ok else 0
            keep, add = fold_coefficients(getattr(self, f"n_{name}"), cnt, getattr(self, f"ema_{name}"), self.ema_decay)
            if add:
                self.factors[side].mul_(keep).add_(self.pending[side], alpha=add)
            setattr(self, f"n_{name}", getattr(self, f"n_{name}") + cnt)
        self.pending.zero_()
        self.counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "ema_decay": self.ema_decay,
            "factors": self.factors.detach().cpu().clone(),
            "pending": self.pending.detach().cpu().clone(),
            "counts": self.counts.detach().cpu().clone(),
            "n_a": self.n_a,
            "n_g": self.n_g,
            "ema_a": self.ema_a,
            "ema_g": self.ema_g,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["rank"]) != self.rank:
            raise ValueError(
                f"K-FAC statistics in the checkpoint have rank {state['rank']} but the layer has rank {self.rank}; "
                "resume with the same LoRA r."
            )
        self.ema_decay = float(state["ema_decay"])
        self.factors.copy_(state["factors"])
        self.pending.copy_(state["pending"])
        self.counts.copy_(state["counts"])
        self.n_a, self.n_g = int(state["n_a"]), int(state["n_g"])
        self.ema_a, self.ema_g = bool(state["ema_a"]), bool(state["ema_g"])


def energy_rank(eigvals: torch.Tensor, threshold: float, min_rank: int = 1, max_rank: int | None = None) -> int:
    """Smallest k whose k largest eigenvalues hold ``threshold`` of their sum, clamped to [min_rank, max_rank].

    ``eigvals`` ``[r]`` in any order; negative round-off is clipped to 0, and the energy
    comparison allows 1e-6 of slack for fp32 eigenvalues. A zero spectrum gives ``min_rank``.
    """
    ev = eigvals.detach().double().clamp_min(0).sort(descending=True).values
    max_rank = ev.numel() if max_rank is None else max_rank
    total = float(ev.sum())
    if total <= 0.0:
        return max(1, min(min_rank, max_rank))
    cum = torch.cumsum(ev, 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype) - 1e-6).item()) + 1
    return int(max(min_rank, min(k, max_rank)))


def grit_layers(model: nn.Module) -> dict[str, GritLoraLinear]:
    """All GRIT layers of ``model`` by module path (``model.named_modules()`` names)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, GritLoraLinear)}


def _matches(name: str, target: str) -> bool:
    """peft's list rule for target_modules: the full name or a ``.``-separated suffix."""
    return name == target or name.endswith("." + target)


def inject_grit_layers(
    model: nn.Module,
    target_modules: Sequence[str],
    r: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> dict[str, GritLoraLinear]:
    """Replace every linear module whose name ends in a ``target_modules`` entry by a GritLoraLinear.

    Matching is peft's: a target matches a module whose full name equals it or ends in
    ``.<target>``. Every parameter of ``model`` is frozen except the new lora_A/lora_B.
    Raises ValueError when a target matches no ``nn.Linear``/``Linear4bit`` (listing the
    linear names that exist) or when the model already holds GRIT layers.
    """
    if isinstance(target_modules, str) or not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(
            f"target_modules must be a non-empty list of module-name suffixes such as ['q_proj', 'v_proj'], "
            f"got {target_modules!r}."
        )
    _check_hparams(r, alpha, dropout)
    if grit_layers(model):
        raise ValueError(f"{type(model).__name__} already holds GRIT layers; inject once per model.")
    linear_names = [name for name, m in model.named_modules() if name and _is_supported_linear(m)]
    targets = list(dict.fromkeys(target_modules))
    chosen = [name for name in linear_names if any(_matches(name, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in linear_names)]
    if unmatched:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
        raise ValueError(
            f"target_modules {unmatched} matched no nn.Linear/Linear4bit in {type(model).__name__}; "
            f"linear module names available: {available}."
        )
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, GritLoraLinear] = {}
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = GritLoraLinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        setattr(parent, child, layer)
        layers[name] = layer
    return layers


def _truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of B @ A (Eckart-Young) from r x r work: A ``[r, in]``, B ``[out, r]``.

    B A = Q_B (R_B R_A^T) Q_A^T with thin QRs of B and A^T; the SVD of the r x r core
    gives B' = Q_B U_k sqrt(S_k) ``[out, k]`` and A' = sqrt(S_k) V_k^T Q_A^T ``[k, in]``.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # [out, r], [r, r]
    Qa, Ra = torch.linalg.qr(A.double().T)  # [in, r], [r, r]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    root = S[:k].sqrt()
    B_k = Qb @ (U[:, :k] * root)  # [out, k]
    A_k = (root[:, None] * Vh[:k]) @ Qa.T  # [k, in]
    return A_k.to(A.dtype), B_k.to(B.dtype)


def adapter_rank(A: torch.Tensor, B: torch.Tensor, rtol: float = 1e-5) -> int:
    """Numerical rank of B @ A ``[out, in]`` from its r x r core (see :func:`_truncate`)."""
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().T)
    s = torch.linalg.svdvals(Rb @ Ra.T)
    return int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0


def _write_atomically(output_dir: str | os.PathLike, write: Any) -> Path:
    """Run ``write(tmp_dir)`` in a fresh sibling folder, then move its files into ``output_dir``.

    A failure leaves ``output_dir`` as it was (no half-written adapter).
    """
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another output_dir.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_grit_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str,
    target_modules: Sequence[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool = False,
    truncate_to_effective_rank: Mapping[str, int] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write GRIT's adapter as a standard peft LoRA folder: adapter_config.json + adapter_model.safetensors.

    ``model`` is the transformers model the layers were injected into (not a wrapper
    around it): its module paths become peft's keys
    ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, so
    ``PeftModel.from_pretrained(base, output_dir)`` reproduces the GRIT model.
    ``truncate_to_effective_rank`` ``{module path: k}`` stores the best rank-k factors of
    B A for those layers (exact when B A has rank <= k, e.g. after one-sided reprojection
    to k) and records them in peft's ``rank_pattern``, with ``alpha_pattern`` set so the
    scaling stays ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Tensors keep the
    adapter dtype. Returns the folder.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    _check_hparams(r, alpha, dropout)
    layers = grit_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no GRIT layers: pass the transformers model that "
            "inject_grit_layers modified."
        )
    for name, layer in layers.items():
        if layer.r != r or not math.isclose(layer.alpha, float(alpha)) or layer.use_rslora != bool(use_rslora):
            raise ValueError(
                f"GRIT layer {name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora} but export was "
                f"asked for r={r}, alpha={alpha}, use_rslora={use_rslora}; pass the values the layers were built with."
            )
    truncate = dict(truncate_to_effective_rank or {})
    unknown = sorted(set(truncate) - set(layers))
    if unknown:
        raise ValueError(
            f"truncate_to_effective_rank names unknown GRIT layers {unknown[:5]}; known: {list(layers)[:5]}..."
        )
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers.items():
        A = layer.lora_A.weight.detach()
        B = layer.lora_B.weight.detach()
        if name in truncate:
            k = truncate[name]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
                raise ValueError(f"truncate_to_effective_rank[{name!r}] must be an int in [1, {r}], got {k!r}.")
            if k < r:
                A, B = _truncate(A, B, k)
                key = re.escape(name)  # peft matches pattern keys as regexes against module paths
                rank_pattern[key] = k
                alpha_pattern[key] = float(alpha) * (math.sqrt(k / r) if use_rslora else k / r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
        use_rslora=bool(use_rslora),
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return _write_atomically(output_dir, write)


def save_kfac_artifacts(
    layers: Mapping[str, GritLoraLinear],
    output_dir: str | os.PathLike,
    effective_ranks: Mapping[str, int] | None = None,
    energy_threshold: float = 0.9,
) -> Path:
    """Write ``kfac_factors.safetensors`` and ``effective_rank.json`` for GRIT layers with statistics.

    Tensors per layer path ``<name>``: ``<name>.S_a``, ``<name>.S_g`` ``[r, r]`` (fp32
    factors), ``<name>.eigvals_a``/``_g`` ``[r]`` (descending) and ``<name>.eigvecs_a``/``_g``
    ``[r, r]`` (columns, same order). effective_rank.json per layer: ``r``,
    ``effective_rank`` (from ``effective_ranks``, e.g. the reprojection callback's, else the
    energy rank), ``energy_rank`` (smallest k holding ``energy_threshold`` of S_a's trace),
    ``adapter_rank`` (numerical rank of B A), token counts ``n_a``/``n_g``.
    """
    from safetensors.torch import save_file

    if not 0.0 < energy_threshold <= 1.0:
        raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold!r}.")
    with_stats = {name: layer for name, layer in layers.items() if layer.stats is not None}
    if not with_stats:
        raise ValueError(
            "No GRIT layer has K-FAC statistics: train with callbacks.kfac.KFACPreconditioner before saving artifacts."
        )
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, layer in with_stats.items():
        st = layer.stats
        assert st is not None
        entry: dict[str, Any] = {"r": layer.r, "n_a": st.n_a, "n_g": st.n_g}
        for side in ("a", "g"):
            S = getattr(st, f"S_{side}").detach().float().cpu()
            ev, V = torch.linalg.eigh(S)  # ascending
            tensors[f"{name}.S_{side}"] = S.contiguous()
            tensors[f"{name}.eigvals_{side}"] = ev.flip(0).contiguous()
            tensors[f"{name}.eigvecs_{side}"] = V.flip(1).contiguous()
            if side == "a":
                entry["energy_rank"] = energy_rank(ev, energy_threshold, 1, layer.r)
        given = effective_ranks is not None and name in effective_ranks
        entry["effective_rank"] = int(effective_ranks[name]) if given else entry["energy_rank"]
        entry["adapter_rank"] = adapter_rank(layer.lora_A.weight.detach().cpu(), layer.lora_B.weight.detach().cpu())
        report[name] = entry
    summary = {
        "energy_threshold": energy_threshold,
        "effective_rank_source": "reprojection" if effective_ranks else "energy",
        "mean_effective_rank": sum(e["effective_rank"] for e in report.values()) / len(report),
        "mean_adapter_rank": sum(e["adapter_rank"] for e in report.values()) / len(report),
        "layers": report,
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "kfac_factors.safetensors"), metadata={"format": "pt"})
        (tmp / "effective_rank.json").write_text(json.dumps(summary, indent=2) + "\n")

    return _write_atomically(output_dir, write)
