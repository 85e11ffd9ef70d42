"""GRIT's LoRA layer, its hand-over of rank-space activations to the statistics, and injection.

GRIT needs the activations and output gradients of the LoRA rank space, which peft's LoRA layer
does not expose in a form that can be counted once per micro-batch; hence a small layer of our own
(peft's conventions: A kaiming-uniform(a=sqrt(5)), B zeros, scaling alpha/r or alpha/sqrt(r)).
What it saves is a standard peft LoRA adapter (:mod:`fteval.grit.export`).

Per token, layer y = W x + s B A x: u = A x (r), g = dL/dy (d_out), v = B^T g (r). The layer
hands u (and, through autograd, s v) to ``layer.capture`` (a
:class:`fteval.grit.capture.StatisticsCapture`); the capture turns them into the factors
S_a = E[u u^T] and S_g = E[v v^T] on ``layer.stats``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from fteval.grit.capture import StatisticsCapture
    from fteval.grit.reprojection import KeptSubspace
    from fteval.grit.stats import RankSpaceStats

__all__ = ["GritLoraLinear", "LayerState", "grit_layers", "inject_grit_layers"]


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
    in the autocast dtype like peft's LoRA layer (an fp32 branch would keep an fp32 copy of every
    adapted layer's input; BENCHMARKS.md has what that cost). The statistics accumulate u = A x in fp32 either way; the sum is
    cast back to the base output's dtype.

    ``adapter_enabled = False`` makes the layer exactly its base layer (the paired
    baseline pass). What GRIT keeps per layer lives on it: ``stats`` (the K-FAC factors, a
    :class:`fteval.grit.stats.RankSpaceStats` once statistics are attached) and ``subspace``
    (what the reprojection keeps, a :class:`fteval.grit.reprojection.KeptSubspace`); both
    None until then.

    The branch is written out with plain tensor ops (``x A^T``, then ``addmm`` fusing the
    residual add into the second matmul) so the forward can hand u = A x to ``capture``
    directly, which keeps u's gradient (``retain_grad``) for v; no module hooks, no Python
    autograd Function in eager mode (both cost more host time per layer than the kernels
    they launch at small batches; BENCHMARKS.md). Inside a ``torch.compile``d block, where
    hooks cannot be registered, u goes through ``_GritLeafTap`` or ``_GritTap`` instead (see
    the comment above them). The LoRA scaling is applied to B (fused into its cast), not to
    u. ``lora_A``/``lora_B`` stay ``nn.Linear`` modules for their parameters and
    peft-compatible names, but forward does not call them, so hooks registered on them do
    not fire.
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
        self.subspace: KeptSubspace | None = None
        self.capture: StatisticsCapture | None = None  # receives u (and du) while statistics are attached
        # inside a compiled block: a [2, tokens, r] leaf the capture sizes per micro-batch, whose
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
        if self.capture is not None and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # inside a compiled graph: u and du reach the capture from the backward, no graph break
                leaf = self.kfac_leaf
                if leaf is not None and leaf.shape[1] == u.shape[0]:
                    u = _GritLeafTap.apply(u, leaf)
                else:  # the capture could not size a slot for this micro-batch: the opaque hand-over op
                    u = _GritTap.apply(u.view(*x.shape[:-1], self.r), self.lora_A.weight).view(-1, self.r)
            else:
                _record(self, u, x.shape[:-1])
        # The scaling goes into B's cast (one fused kernel when compiled) rather than a multiply of u
        # (a separate kernel per layer in forward and in backward). The gradient reaching u is
        # still scaling * B^T dL/dy, which the capture divides out.
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
    """Hand u to the capture once per micro-batch (gradient checkpointing re-runs forward)."""
    st = layer.stats
    if st is not None and not st.counted:
        st.counted = True
        layer.capture.record(layer, u, lead)


# ---------------------------------------------------------------------------------------------
# The same hand-over inside torch.compile'd blocks (AdapterModule's compile_blocks).
#
# Preferred path: u passes through ``_GritLeafTap`` (identity in forward, a view, no copy) together
# with ``layer.kfac_leaf``, a [2, tokens, r] leaf tensor with zero strides (no storage) that the
# capture sizes at each micro-batch start. The tap's backward returns ``stack([u, du])`` as the
# leaf's "gradient": one fused kernel inside the compiled backward, and autograd's C++
# AccumulateGrad stores it in ``leaf.grad`` without a copy. The capture reads every layer's
# ``leaf.grad`` after backward and folds them with its batched Gram matmuls. No Python runs per layer
# during the step. The opaque op below costs host time in the op itself plus three device copies per
# layer (u, du, the returned du); BENCHMARKS.md has the measured cost.
#
# Fallback, for micro-batches whose token count the capture cannot know in advance (no labels,
# attention mask or input_ids in the batch):
#
# A compiled graph cannot hold the capture's Python (it keeps u and asks autograd for its gradient).
# Leaving the graph at every adapted layer (torch.compiler.disable) would cut a block into 8 graphs
# (slower than eager; BENCHMARKS.md). Instead the forward passes u through ``_GritTap``,
# an autograd Function the compiler traces (identity; it saves u), and its backward calls one opaque
# op, ``fteval::grit_record(u, du, lora_A)``, which hands both u and du to the capture: one Python
# call per layer per backward, none in forward, so gradient checkpointing's recompute records
# nothing and needs no once-per-micro-batch flag. The op finds its layer from the lora_A weight
# (its storage address: an int argument would be a constant baked into the graph, one recompile
# per layer), hence the process-wide registry of GRIT layers below, and gives the capture copies:
# a compiled graph reuses its buffers after their last use. The op is registered with the low-level
# torch.library API (no Python autograd wrapper: it only ever runs inside backward), which avoids the
# per-call cost of torch.library.custom_op's wrapper.
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
    """Backward of a compiled GRIT layer: u and du ``[..., r]`` to the capture; returns du (a copy)."""
    layer = _layer_of(lora_A)
    if layer.capture is not None and layer.stats is not None:
        layer.capture.record_pair(layer, u.clone(), grad.clone(), tuple(u.shape[:-1]))
    return grad.clone()


if not hasattr(torch.ops.fteval, "grit_record"):  # once per process (re-imports keep the first registration)
    _LIB = torch.library.Library("fteval", "DEF")
    _LIB.define("grit_record(Tensor u, Tensor grad, Tensor lora_A) -> Tensor")
    _LIB.impl("grit_record", _grit_record, "CompositeExplicitAutograd")
    torch.library.register_fake("fteval::grit_record", lambda u, grad, lora_A: torch.empty_like(grad), lib=_LIB)


class _GritLeafTap(torch.autograd.Function):
    """Identity on u ``[N, r]`` whose backward writes ``stack([u, du])`` into ``leaf.grad``.

    ``leaf`` is ``[2, N, r]`` with zero strides and ``requires_grad``: a slot, never read. The
    pair takes the slot's dtype (the capture picks the training precision's: bf16 under
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


# ---------------------------------------------------------------------------------------------
# Injection
# ---------------------------------------------------------------------------------------------


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


class LayerState:
    """Base of what keeps GRIT state on attached layers (K-FAC statistics, kept subspaces) and saves it.

    A checkpoint can be restored before the model's layers are attached (Lightning restores
    callback state before the model is set up): a state loaded while nothing is attached is held, restored by :meth:`_restore_pending` once ``_layers`` is
    set, and returned unchanged if saved in between. Subclasses build their state in
    :meth:`_state` and restore it onto ``_layers`` in :meth:`_apply_state`.
    """

    _layers: dict[str, GritLoraLinear]
    _pending_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        if not self._layers and self._pending_state is not None:
            return dict(self._pending_state)  # loaded but not attached yet
        return self._state()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore now if attached, else once attached."""
        if self._layers:
            self._apply_state(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def _restore_pending(self) -> None:
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError
