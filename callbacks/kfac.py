"""K-FAC natural-gradient preconditioning of GRIT's LoRA factors, as a Lightning callback.

Statistics: every :class:`~fteval.models.grit_layer.GritLoraLinear` hands its rank-space
activations u to this callback from its forward (``layer.recorder``) and v through its
gradient; the callback records the rank-space factors S_a = E[u u^T] (u = A x) and
S_g = E[v v^T] (v = B^T dL/dy) in fp32 on ``layer.stats`` (a
:class:`~fteval.models.grit_layer.RankSpaceStats`). The equations, every default and where
it comes from (the spec, the GRIT reference code of arXiv 2601.00231, or fteval) are in
docs/grit.md; the defaults below are GRIT's, fteval's variants are named options.

Which factor preconditions which gradient (``pairing``), with M_a = S_a + l I, M_g = S_g + l I:

* ``"grit"`` (default, the reference's pairing): dB <- dB M_g^-1, dA <- M_a^-1 dA.
* ``"kfac"``: textbook K-FAC restricted to the r x r factors. B's input is u, so
  dB <- dB M_a^-1; A's output-side gradient is (scaling x) v, so dA <- M_g^-1 dA: the
  Kronecker block of the Fisher for each factor with the large side left as identity.

Both are descent directions (a symmetric positive definite matrix on one side).

Damping (``damping_mode``): ``"absolute"`` (default; the spec's 1e-2 read as the reference
reads it) uses l = damping; ``"trace"`` uses l = damping * tr(S) / r, relative to the
factor's mean eigenvalue, which stays meaningful when S_g is tiny (mean-reduced losses,
B near 0) where an absolute 1e-2 swamps it. A side is used once it has ``min_samples``
tokens and a positive finite trace (S_g is exactly 0 while B = 0: that side is then left
as is).

Scale: the reference keeps the preconditioned gradient's magnitude (units 1/S, so its
size depends on S_g's scale). ``preserve_grad_norm=True`` (an fteval variant) rescales
each preconditioned gradient tensor to its original norm so the learning rate keeps its
meaning.

Clipping (``clip_grad_norm``): the reference wraps the optimizer, so transformers' Trainer
clips the raw gradients *before* they are preconditioned. Lightning calls this hook before
its own clipping (below), so ``trainer.gradient_clip_val`` clips the *preconditioned*
gradients. ``clip_grad_norm`` (default 1.0) clips the global norm of the optimizer's
gradients here, before preconditioning, as the reference does; set it to None and
``trainer.gradient_clip_val`` to clip after preconditioning instead.

Hook placement (Lightning 2.6, verified in lightning/pytorch/plugins/precision/precision.py
and amp.py): ``optimizer.step(closure)`` runs the closure (training_step + backward), then
``Precision._after_closure`` calls the callbacks' ``on_before_optimizer_step``, then
``_clip_gradients``; only after that does the optimizer update the parameters. Under fp16
AMP, ``MixedPrecision.optimizer_step`` calls ``scaler.unscale_(optimizer)`` *before*
``_after_closure``. So :meth:`on_before_optimizer_step` sees whole (accumulated), unscaled
gradients, before Lightning's clipping and before the step: the place where editing
``.grad`` counts.

Cost: the statistics of all layers of one rank and device live in shared buffers
(``[layers, 2, r, r]``), so folding is a few batched operations, refreshing is one batched
fp32 Cholesky/eigvalsh of all due factors on the CPU (r x r matrices: cheaper there than
hundreds of tiny GPU launches), and preconditioning is one batched ``cholesky_solve`` per
group of same-shaped gradients (timings in BENCHMARKS.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fteval.models.base import is_logging_step
from fteval.models.grit_layer import GritLoraLinear, RankSpaceStats, grit_layers

__all__ = ["KFACPreconditioner", "damped_cholesky", "token_mask_from_batch"]

_PAIRINGS = ("grit", "kfac")
_DAMPING_MODES = ("absolute", "trace")
_FACTOR_AVERAGES = ("ema", "mean")
_STATISTICS_TOKENS = ("loss", "all")


def token_mask_from_batch(batch: Any, tokens: str = "loss") -> torch.Tensor | None:
    """Mask ``[batch, seq]`` (bool) of the positions whose statistics count, or None (all count).

    ``tokens="loss"``: HF causal-LM convention, ``labels`` equal ``input_ids`` with -100 where
    no loss is taken, and position t's output predicts ``labels[t + 1]``; so position t
    counts when ``labels[:, t + 1] != -100`` (the last position predicts nothing). Without
    labels, ``attention_mask`` marks the real tokens. ``tokens="all"``: every non-padding
    position (``attention_mask``), prompt included, as the GRIT reference's hooks see them.
    Without either tensor, None.
    """
    if tokens not in _STATISTICS_TOKENS:
        raise ValueError(f"statistics_tokens must be one of {_STATISTICS_TOKENS}, got {tokens!r}.")
    if not isinstance(batch, Mapping):
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


def damped_cholesky(
    S: torch.Tensor, damping: float, damping_mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cholesky factors of damped factors, fp32: S ``[..., r, r]`` -> (L, inv_scale, cond, ok).

    ``trace`` mode factorises the normalised M / c = S / c + damping I with c = tr(S)/r
    (well scaled even when S ~ 1e-20) and returns inv_scale = 1/c, so that
    (S + damping c I)^-1 = inv_scale (L L^T)^-1; ``absolute`` factorises S + damping I
    (inv_scale 1). ``cond`` ``[...]`` is the condition number of the damped factor.
    ``ok`` ``[...]`` is False where the trace is not positive and finite (no curvature
    information yet, e.g. S_g while B = 0) or the factorisation failed; L is then identity.
    """
    S = S.float()
    r = S.shape[-1]
    tr = torch.diagonal(S, dim1=-2, dim2=-1).sum(-1)  # [...]
    ok = torch.isfinite(tr) & (tr > 0)
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    if damping_mode == "trace":
        c = torch.where(ok, tr / r, torch.ones_like(tr))
        M = S / c[..., None, None] + damping * eye
    else:
        c = torch.ones_like(tr)
        M = S + damping * eye
    M = torch.where(ok[..., None, None], 0.5 * (M + M.transpose(-1, -2)), eye)
    chol, info = torch.linalg.cholesky_ex(M)
    ok = ok & (info == 0)
    chol = torch.where(ok[..., None, None], chol, eye)
    ev = torch.linalg.eigvalsh(torch.where(ok[..., None, None], M, eye))  # ascending
    cond = torch.where(ev[..., 0] > 0, ev[..., -1] / ev[..., 0], torch.full_like(ev[..., 0], float("inf")))
    return chol, 1.0 / c, cond, ok


class _Group:
    """GRIT layers of one (device, rank): their statistics and cached Cholesky factors in shared buffers."""

    def __init__(self, names: list[str], layers: list[GritLoraLinear], rank: int, ema_decay: float) -> None:
        device = layers[0].lora_A.weight.device
        n = len(layers)
        self.names, self.layers, self.rank, self.device = names, layers, rank, device
        self.factors = torch.zeros(n, 2, rank, rank, dtype=torch.float32, device=device)  # S_a, S_g
        self.pending = torch.zeros_like(self.factors)  # sums of this optimizer step
        self.counts = torch.zeros(n, 2, dtype=torch.int64, device=device)  # tokens of this optimizer step
        self.tokens = torch.zeros(n, 2, dtype=torch.float64, device=device)  # folded tokens (n_a, n_g)
        self.ema = torch.zeros(n, 2, dtype=torch.bool, device=device)  # side in EMA mode (mirrors stats.ema_*)
        self.dropped = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite step was dropped
        self.chol = torch.zeros_like(self.factors)  # cached Cholesky factors of the damped factors
        self.has_chol = [[False, False] for _ in range(n)]
        self.inv_scale = [[1.0, 1.0] for _ in range(n)]
        self.cond = [[float("nan"), float("nan")] for _ in range(n)]
        self.refreshed_at = [[-1, -1] for _ in range(n)]  # optimizer step of the last refresh, -1 = never
        for i, layer in enumerate(layers):
            old = layer.stats
            storage = (self.factors[i], self.pending[i], self.counts[i], self.tokens[i])
            layer.stats = RankSpaceStats(rank, device, ema_decay, storage=storage)
            if old is not None and old.rank == rank:  # statistics of an earlier fit carry over
                layer.stats.load_state_dict(old.state_dict())
                layer.stats.ema_decay = ema_decay
        self.sync_ema()

    def sync_ema(self) -> None:
        """Copy the layers' host-side EMA flags into the device mask the batched fold reads."""
        flags = [[st.ema_a, st.ema_g] for st in (layer.stats for layer in self.layers)]
        self.ema.copy_(torch.tensor(flags, dtype=torch.bool))

    def fold(self, ema_decay: float) -> None:
        """All-reduce (DDP) and fold the pending sums, on the device (no host sync).

        Per layer and side the same arithmetic as :func:`fteval.models.grit_layer.fold_coefficients`: running mean
        while ``ema`` is off, EMA after; a side whose sums are not finite (fp16 overflow) is
        dropped for this step and ``dropped`` is set.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(self.pending)
                torch.distributed.all_reduce(self.counts)
        finite = torch.isfinite(self.pending).flatten(2).all(-1)  # [n, 2]
        self.dropped |= ((self.counts > 0) & ~finite).any()
        cnt = torch.where(finite, self.counts, 0).double()  # [n, 2]
        total = (self.tokens + cnt).clamp_min(1.0)
        keep = torch.where(self.ema, ema_decay, self.tokens / total)
        add = torch.where(self.ema, (1.0 - ema_decay) / cnt.clamp_min(1.0), 1.0 / total)
        used = cnt > 0
        keep = torch.where(used, keep, 1.0).float()[..., None, None]
        add = torch.where(used, add, 0.0).float()[..., None, None]
        self.pending.masked_fill_(~finite[..., None, None], 0.0)
        self.factors.mul_(keep).add_(self.pending * add)
        self.tokens += cnt
        self.pending.zero_()
        self.counts.zero_()

    def take_dropped(self) -> bool:
        """Whether a non-finite step was dropped since the last call (reads the device: a sync)."""
        flag = bool(self.dropped)
        self.dropped.zero_()
        return flag

    def refresh(
        self, step: int, update_freq: int, min_samples: int, damping: float, damping_mode: str, ema: bool = True
    ) -> bool:
        """Re-factorise every side that is ready and due (never factorised, or ``update_freq`` steps old).

        ``ema``: a side switches from the running mean to the EMA at its first factorisation
        (False: it stays a cumulative mean, the reference's averaging). Returns True when a
        side got its first factor (which gradients are preconditioned changed).
        """
        stale = [
            (i, side)
            for i in range(len(self.layers))
            for side in (0, 1)
            if not self.has_chol[i][side] or step - self.refreshed_at[i][side] >= update_freq
        ]
        if not stale:
            return False  # the usual step: nothing read from the device
        tokens = self.tokens.tolist()
        due = [(i, side) for i, side in stale if tokens[i][side] >= min_samples]
        if not due:
            return False
        rows = torch.tensor([d[0] for d in due], device=self.device)
        sides = torch.tensor([d[1] for d in due], device=self.device)
        chol, inv_scale, cond, ok = damped_cholesky(self.factors[rows, sides].cpu(), damping, damping_mode)
        good = [j for j, flag in enumerate(ok.tolist()) if flag]  # degenerate sides keep their previous cache
        if not good:
            return False
        first = any(not self.has_chol[due[j][0]][due[j][1]] for j in good)
        sel = torch.tensor(good)
        self.chol[rows[sel.to(self.device)], sides[sel.to(self.device)]] = chol[sel].to(self.device)
        inv_list, cond_list = inv_scale.tolist(), cond.tolist()
        for j in good:
            i, side = due[j]
            self.has_chol[i][side] = True
            self.inv_scale[i][side] = inv_list[j]
            self.cond[i][side] = cond_list[j]
            self.refreshed_at[i][side] = step
            if ema:  # running mean until first use, EMA after
                setattr(self.layers[i].stats, "ema_" + "ag"[side], True)
        self.sync_ema()
        return first

    def side_state(self, i: int, side: int) -> dict[str, Any]:
        return {
            "chol": self.chol[i, side].detach().cpu().clone() if self.has_chol[i][side] else None,
            "inv_scale": self.inv_scale[i][side],
            "cond": self.cond[i][side],
            "refreshed_at": self.refreshed_at[i][side],
        }

    def load_side_state(self, i: int, side: int, state: Mapping[str, Any]) -> None:
        self.has_chol[i][side] = state["chol"] is not None
        if state["chol"] is not None:
            self.chol[i, side].copy_(state["chol"])
        self.inv_scale[i][side] = float(state["inv_scale"])
        self.cond[i][side] = float(state["cond"])
        self.refreshed_at[i][side] = int(state["refreshed_at"])


def _precision_dtype(trainer: Any) -> torch.dtype:
    """The dtype activations have under the trainer's precision ("bf16-mixed" -> bf16, "16-mixed" -> fp16, else fp32)."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)  # one launch for many tensors
    else:  # pragma: no cover - older torch
        for t, s in zip(targets, sources):
            t.copy_(s)


class _Recording:
    """One GRIT layer's statistics for one micro-batch: u from its forward, v from its backward.

    The real-token mask and the AMP loss scale are those of the micro-batch the forward ran in.
    The gradient reaching u is ``scaling * v * loss_scale`` (v = B^T dL/dy), so its Gram matrix
    is divided by ``(scaling * loss_scale)^2``.
    """

    __slots__ = ("cb", "group", "row", "mask", "count", "scale", "lead")

    def __init__(self, cb: "KFACPreconditioner", group: "_Group", row: int) -> None:
        self.cb, self.group, self.row = cb, group, row
        self.mask = self.count = None
        self.scale = 1.0
        self.lead: tuple = ()

    def record(self, u: torch.Tensor, lead: tuple, scaling: float) -> None:
        """u ``[N, r]`` (N = prod(lead) tokens) from the forward; asks autograd to keep its gradient.

        ``u.retain_grad()`` keeps dL/du in ``u.grad`` with a hook that runs in C++; :meth:`flush`
        reads it after backward (or at the next micro-batch's start). A Python tensor hook did the
        same at twice the host cost: recording cost ~57-65 us per layer and micro-batch with the
        hook and 24-31 us with ``retain_grad`` (CPU, fwd + bwd of 32 GRIT layers, BENCHMARKS.md).
        """
        t0 = time.perf_counter()
        self.lead = tuple(lead)
        self.mask, self.count = self.cb._mask_for(self.lead, u.device)
        self.cb._defer(self.group, self.row, 0, u.detach(), self.mask, self.count, 1.0)
        self.scale = 1.0 / (scaling * self.cb._grad_scale) ** 2
        if u.requires_grad:  # eager; compiled GRIT layers call record_pair
            u.retain_grad()
            self.cb._awaiting_grad.append((self, u))
        self.cb._hook_seconds += time.perf_counter() - t0

    def record_pair(self, u: torch.Tensor, grad: torch.Tensor, lead: tuple, scaling: float) -> None:
        """u and its gradient ``[N, r]`` at once (compiled GRIT layers report both from their backward)."""
        self.record(u, lead, scaling)
        self.gradients(grad)

    def gradients(self, grad: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.cb._defer(self.group, self.row, 1, grad.detach(), self.mask, self.count, self.scale)
        self.cb._hook_seconds += time.perf_counter() - t0


class KFACPreconditioner(L.Callback):
    """Rank-space K-FAC preconditioning of every GRIT layer's lora_A/lora_B gradient.

    Args (defaults are GRIT's: the spec's values, the reference's where the spec is silent;
    docs/grit.md says which is which):
        ema_decay: beta of the factors' EMA (spec: momentum 0.95), used once a side has been
            factorised (running mean before).
        update_freq: optimizer steps between refreshes of the cached Cholesky factors
            (spec: 20; statistics accumulate every step).
        damping: lambda (spec: 1e-2); absolute or relative to tr(S)/r, see ``damping_mode``.
        damping_mode: ``"absolute"`` (reference) or ``"trace"`` (fteval variant), module docstring.
        min_samples: real tokens a factor needs before it is used; until then that side's
            gradient is left unpreconditioned.
        pairing: ``"grit"`` (reference) or ``"kfac"`` (textbook, fteval variant), module docstring.
        preserve_grad_norm: rescale each preconditioned gradient tensor to its original norm
            (fteval variant; the reference keeps the preconditioned magnitude).
        clip_grad_norm: clip the global norm of the optimizer's gradients to this value
            *before* preconditioning (the reference's order under transformers' Trainer,
            its max_grad_norm 1.0); None: no clipping here (``trainer.gradient_clip_val``
            then clips after preconditioning). Runs even with ``enabled=False``.
        factor_average: ``"ema"`` (spec: momentum-based updates) or ``"mean"`` (cumulative
            token-weighted mean throughout, the reference's averaging).
        statistics_tokens: ``"loss"`` (positions that predict a loss token; fteval's choice:
            the Fisher of the trained objective) or ``"all"`` (every non-padding position,
            as the reference's hooks record).
        enabled: False keeps collecting statistics (the reprojection callback and the
            artifacts use them) but never preconditions a gradient: plain LoRA, for ablations.

    Logged per optimizer step: ``grit/preconditioned_layers`` (layers with at least one
    preconditioned gradient this step), ``grit/preconditioned_grads`` (tensors),
    ``grit/factor_cond_max`` (largest condition number of the cached damped factors),
    ``grit/kfac_ms`` (time in this hook, CUDA-synchronised) and ``grit/kfac_hook_ms`` (host
    time spent recording statistics since the previous step; no kernels are launched
    there, the arithmetic runs batched in this hook).

    Under DDP the per-step statistics (sums and token counts) are all-reduced before they
    are folded, so every rank holds identical factors and preconditions identically.
    Only DDP-style strategies (full parameters on every rank) are supported.
    """

    def __init__(
        self,
        ema_decay: float = 0.95,
        update_freq: int = 20,
        damping: float = 1e-2,
        damping_mode: str = "absolute",
        min_samples: int = 128,
        pairing: str = "grit",
        preserve_grad_norm: bool = False,
        clip_grad_norm: float | None = 1.0,
        factor_average: str = "ema",
        statistics_tokens: str = "loss",
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if pairing not in _PAIRINGS:
            raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}.")
        if damping_mode not in _DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {_DAMPING_MODES}, got {damping_mode!r}.")
        if factor_average not in _FACTOR_AVERAGES:
            raise ValueError(f"factor_average must be one of {_FACTOR_AVERAGES}, got {factor_average!r}.")
        if statistics_tokens not in _STATISTICS_TOKENS:
            raise ValueError(f"statistics_tokens must be one of {_STATISTICS_TOKENS}, got {statistics_tokens!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"update_freq must be a positive integer (optimizer steps), got {update_freq!r}.")
        if not damping > 0.0:
            raise ValueError(f"damping must be > 0, got {damping!r}.")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer (tokens), got {min_samples!r}.")
        if clip_grad_norm is not None and (
            isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float)) or not clip_grad_norm > 0
        ):
            raise ValueError(f"clip_grad_norm must be a number > 0 or null (no clipping here), got {clip_grad_norm!r}.")
        self.ema_decay = float(ema_decay)
        self.update_freq = update_freq
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.min_samples = min_samples
        self.pairing = pairing
        self.preserve_grad_norm = bool(preserve_grad_norm)
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.factor_average = factor_average
        self.statistics_tokens = statistics_tokens
        self.enabled = bool(enabled)

        self.step = 0  # optimizer steps processed by this callback
        self._layers: dict[str, GritLoraLinear] = {}
        self._groups: list[_Group] = []
        self._where: dict[str, tuple[_Group, int]] = {}  # layer path -> (group, row)
        self._attached: list[GritLoraLinear] = []
        self._mask: torch.Tensor | None = None  # [batch, seq] bool for the current micro-batch
        self._mask_on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # device -> (0/1 floats, count)
        self._mask_warned = False
        self._grad_scale = 1.0  # AMP loss scale of the current micro-batch
        self._hook_seconds = 0.0
        self._pending_state: dict[str, Any] | None = None
        self._deferred: dict[tuple, tuple] = {}  # statistics waiting for flush(), see _defer
        self._awaiting_grad: list[tuple[_Recording, torch.Tensor]] = []  # u whose u.grad flush() reads
        self._leaf_layers: list[tuple[GritLoraLinear, _Group, int]] = []  # GRIT layers inside compiled blocks
        self._leaf_lead: tuple | None = None  # (token dims, dtype) the leaves are made for
        self._leaf_dims: tuple | None = None  # (lead, grad_scale) of the micro-batch that fills them
        self._leaf_deferred: dict[tuple, tuple] = {}  # their (u, du) pairs waiting for flush()
        self._scale_cache: dict[tuple, torch.Tensor] = {}  # per-layer S_g scales -> [layers, 2, 1, 1] on the device
        self._row_of: dict[int, tuple[_Group, int]] = {}  # id(layer) -> (group, row)
        self._chol_version = 0  # bumped when a refresh or a restore changes the cached factors
        self._plan_cache: tuple | None = None
        self._adapter_params: list[torch.Tensor] | None = None  # lora_A/lora_B weights of every layer, in order
        self._index_cache: dict[tuple, torch.Tensor] = {}  # (group, rows) -> row-index tensor on the device

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: torch.nn.Module) -> dict[str, GritLoraLinear]:
        """Create ``layer.stats`` on every GRIT layer of ``model`` and make the layers report their statistics here."""
        self.detach()
        layers = grit_layers(model)
        if not layers:
            raise ValueError(
                f"KFACPreconditioner found no GritLoraLinear in {type(model).__name__}: inject GRIT layers with "
                "fteval.models.grit_layer.inject_grit_layers (GRITModule does so in configure_model)."
            )
        self._layers = layers
        by_key: dict[tuple[torch.device, int], list[str]] = {}
        for name, layer in layers.items():
            by_key.setdefault((layer.lora_A.weight.device, layer.r), []).append(name)
        self._groups, self._where, self._row_of, self._deferred = [], {}, {}, {}
        self._awaiting_grad = []
        self._plan_cache, self._adapter_params, self._index_cache = None, None, {}
        for (_, rank), names in by_key.items():
            group = _Group(names, [layers[n] for n in names], rank, self.ema_decay)
            self._groups.append(group)
            self._where.update({n: (group, i) for i, n in enumerate(names)})
            self._row_of.update({id(layer): (group, i) for i, layer in enumerate(group.layers)})
        for layer in layers.values():
            layer.recorder = self
        self._attached = list(layers.values())
        self._leaf_layers = [
            (layer, group, i) for group in self._groups for i, layer in enumerate(group.layers) if layer.in_compiled_block
        ]
        self._leaf_lead = self._leaf_dims = None
        self._leaf_deferred, self._scale_cache = {}, {}
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)
        return layers

    def detach(self) -> None:
        """Stop recording statistics (they stay on the layers)."""
        for layer in self._attached:
            if layer.recorder is self:
                layer.recorder = None
                layer.kfac_leaf = None
        self._attached = []
        self._leaf_layers, self._leaf_lead, self._leaf_dims = [], None, None

    def begin(self, layer: GritLoraLinear) -> "_Recording":
        """Called by a GRIT layer's forward once per micro-batch: where its u and v go (:class:`_Recording`)."""
        group, row = self._row_of[id(layer)]
        return _Recording(self, group, row)

    def _defer(self, group: _Group, row: int, side: int, t: torch.Tensor, mask: Any, count: Any, scale: float) -> None:
        """Keep a hook's rank-space activations until :meth:`flush` (no kernels launched per layer here)."""
        key = (id(group), side, id(mask) if mask is not None else None, tuple(t.shape), t.dtype)
        entry = self._deferred.get(key)
        if entry is None:
            entry = self._deferred[key] = (group, side, mask, count, [], [], [])
        entry[4].append(row)
        entry[5].append(t)
        entry[6].append(scale)

    def flush(self) -> None:
        """Add the deferred statistics to the pending sums: one batched Gram matmul per shape group.

        At Llama-3-8B scale the per-layer form launched ~4 small kernels per layer and side per
        micro-batch (224 layers); at launch-bound shapes (batch 1, checkpointing) that dominated
        GRIT's overhead. Mathematically identical to ``RankSpaceStats.add_a``/``add_g`` per layer.
        """
        self._collect_grads()
        self._flush_leaves()
        deferred, self._deferred = self._deferred, {}
        for group, side, mask, count, rows, tensors, scales in deferred.values():
            r = group.rank
            X = torch.stack(tensors).reshape(len(tensors), -1, r).float()  # [layers, tokens, r]
            W = X if mask is None else X * mask.reshape(1, -1, 1).to(X.dtype)
            G = W.transpose(1, 2) @ X  # [layers, r, r]
            if all(sc == scales[0] for sc in scales):  # the usual case: one LoRA scaling, one loss scale
                if scales[0] != 1.0:
                    G = G * scales[0]
            else:
                G = G * torch.tensor(scales, dtype=G.dtype).to(G.device, non_blocking=True).view(-1, 1, 1)
            # No host-to-device copies here: a blocking copy (torch.tensor(..., device=cuda)) synchronises
            # the stream, which at launch-bound shapes exposes all of the step's remaining host work.
            index = self._rows_index(group, rows)
            group.pending[:, side].index_add_(0, index, G.to(group.device))
            if count is None:
                tokens = torch.full((len(rows),), X.shape[1], dtype=torch.int64, device=group.device)
            else:
                tokens = count.to(device=group.device, dtype=torch.int64).expand(len(rows)).contiguous()
            group.counts[:, side].index_add_(0, index, tokens)

    def _rows_index(self, group: _Group, rows: list[int]) -> torch.Tensor:
        """The row indices as a device tensor, made once per (group, rows): creating it is a host-to-device copy."""
        key = (id(group), tuple(rows))
        index = self._index_cache.get(key)
        if index is None:
            index = self._index_cache[key] = torch.tensor(rows, device=group.device)
        return index

    def _collect_grads(self) -> None:
        """v-side statistics from the gradients autograd kept on the recorded u (after backward).

        Also run at each micro-batch start, so no u (and the graph it holds) outlives its
        micro-batch; a u whose backward never ran contributes no v-side statistics. Then the
        same for compiled GRIT layers: (u, du) from their leaves' ``.grad`` (:meth:`_collect_leaves`).
        """
        awaiting, self._awaiting_grad = self._awaiting_grad, []
        for recording, u in awaiting:
            if u.grad is not None:
                recording.gradients(u.grad)
        self._collect_leaves()

    def _prepare_leaves(self, lead: tuple | None, dtype: torch.dtype) -> None:
        """Give every GRIT layer inside a compiled block a ``[2, tokens, r]`` leaf for this micro-batch.

        The leaves have zero strides (no memory) and are kept while the token count and dtype
        stay the same; the backward writes (u, du) into their ``.grad`` in ``dtype``. ``lead``
        None (token count unknown): no leaves, and the layers fall back to the
        ``fteval::grit_record`` op (fteval/models/grit_layer.py).
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

    def _collect_leaves(self) -> None:
        """Defer (u, du) of every compiled GRIT layer whose backward filled its leaf; clear the leaves."""
        if not self._leaf_layers or self._leaf_dims is None:
            return
        t0 = time.perf_counter()
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
            entry = self._leaf_deferred.get(key)
            if entry is None:
                entry = self._leaf_deferred[key] = (group, mask, count, [], [], [])
            entry[3].append(row)
            entry[4].append(pair)
            entry[5].append(1.0 / (layer.scaling * grad_scale) ** 2)
        self._hook_seconds += time.perf_counter() - t0

    def _flush_leaves(self) -> None:
        """:meth:`flush` for the compiled layers' (u, du) pairs: one Gram bmm for both sides of all layers."""
        deferred, self._leaf_deferred = self._leaf_deferred, {}
        for group, mask, count, rows, pairs, scales in deferred.values():
            X = torch.stack(pairs).float()  # [layers, 2, tokens, r]
            W = X if mask is None else X * mask.reshape(1, 1, -1, 1).to(X.dtype)
            G = W.transpose(-1, -2) @ X  # [layers, 2, r, r]
            key = tuple(scales)
            side_scale = self._scale_cache.get(key)
            if side_scale is None:  # [layers, 2, 1, 1]: 1 for S_a, 1/(scaling * loss scale)^2 for S_g
                if len(self._scale_cache) > 64:
                    self._scale_cache.clear()
                side_scale = torch.tensor([[1.0, sc] for sc in scales], dtype=G.dtype).view(-1, 2, 1, 1)
                side_scale = self._scale_cache[key] = side_scale.to(G.device)
            index = self._rows_index(group, rows)
            group.pending.index_add_(0, index, (G * side_scale).to(group.device))
            if count is None:
                tokens = torch.full((len(rows), 2), X.shape[2], dtype=torch.int64, device=group.device)
            else:
                tokens = count.to(device=group.device, dtype=torch.int64).expand(len(rows), 2).contiguous()
            group.counts.index_add_(0, index, tokens)

    def _mask_for(self, lead: tuple, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(0/1 float weights of shape ``lead`` = the activations' token dims, their count) on ``device``,
        or (None, None) without a mask."""
        mask = self._mask
        if mask is None:
            return None, None
        if lead != tuple(mask.shape):
            if not self._mask_warned:
                rank_zero_warn(
                    f"KFACPreconditioner: token mask of shape {tuple(mask.shape)} does not match GRIT activations "
                    f"{lead}; statistics use all tokens for such layers."
                )
                self._mask_warned = True
            return None, None
        cached = self._mask_on.get(device)
        if cached is None:
            m = mask.to(device, non_blocking=True)
            cached = self._mask_on[device] = (m.float(), m.sum(dtype=torch.int64))
        return cached

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
        the dtype they hand u and du over in (the training precision's; Lightning's hook
        passes bf16 under ``bf16-mixed``); the statistics are summed in fp32 either way.
        """
        self._collect_grads()  # the previous micro-batch's backward has run
        self._mask = None if token_mask is None else token_mask.bool()
        self._mask_on = {}
        self._grad_scale = float(grad_scale)
        for layer in self._layers.values():
            if layer.stats is not None:
                layer.stats.counted = False
        if self._leaf_layers:
            if token_shape is None and token_mask is not None:
                token_shape = token_mask.shape
            lead = None if token_shape is None else tuple(int(d) for d in token_shape)
            self._prepare_leaves(lead, slot_dtype)
            self._leaf_dims = None if lead is None else (lead, self._grad_scale)

    # ------------------------------------------------------------------ the optimizer-step work
    def _plan(self, optimizer: torch.optim.Optimizer | None) -> tuple[list[tuple], int]:
        """Which gradients to precondition, grouped into same-shaped batches: (jobs, layers touched).

        A job is (group, right-multiplied?, side, rows, row-index tensor, params). Cached until a
        refresh changes which sides have factors, the optimizer changes, or a gradient
        appears or disappears (rebuilding it walks every layer in Python).
        """
        if self._adapter_params is None:
            self._adapter_params = [
                p for group in self._groups for layer in group.layers for p in (layer.lora_A.weight, layer.lora_B.weight)
            ]
        grads_present = tuple(p.grad is not None for p in self._adapter_params)
        key = (self._chol_version, id(optimizer), grads_present)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1], self._plan_cache[2]
        in_opt: set[int] | None = None
        if optimizer is not None:
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        side_of_B, side_of_A = (0, 1) if self.pairing == "kfac" else (1, 0)  # 0 = S_a, 1 = S_g
        by_key: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
        done_layers: set[tuple[int, int]] = set()
        for gi, group in enumerate(self._groups):
            for i, layer in enumerate(group.layers):
                pairs = ((layer.lora_B.weight, side_of_B, True), (layer.lora_A.weight, side_of_A, False))
                for param, side, right in pairs:
                    if param.grad is None or not group.has_chol[i][side]:
                        continue
                    if in_opt is not None and id(param) not in in_opt:
                        continue
                    k = (gi, right, side, tuple(param.grad.shape), param.grad.dtype)
                    rows, params = by_key.setdefault(k, ([], []))
                    rows.append(i)
                    params.append(param)
                    done_layers.add((gi, i))
        jobs = [
            (self._groups[gi], right, side, rows, torch.tensor(rows, device=self._groups[gi].device), params)
            for (gi, right, side, _, _), (rows, params) in by_key.items()
        ]
        self._plan_cache = (key, jobs, len(done_layers))
        return jobs, len(done_layers)

    def _precondition(self, optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
        """Apply the cached inverses to lora_A/lora_B ``.grad`` in place; returns (layers, tensors) done."""
        jobs, n_layers = self._plan(optimizer)
        with torch.no_grad():
            for group, right, side, rows, index, params in jobs:
                grads = [p.grad for p in params]
                G = torch.stack(grads).float()  # B: [m, out, r] (right-multiplied), A: [m, r, in] (left)
                chol = group.chol[index, side]  # [m, r, r]
                if right:
                    new = torch.cholesky_solve(G.transpose(1, 2), chol).transpose(1, 2)  # G M^-1 (M symmetric)
                else:
                    new = torch.cholesky_solve(G, chol)  # M^-1 G
                if self.preserve_grad_norm:
                    old_norm = torch.linalg.vector_norm(G, dim=(1, 2))
                    new_norm = torch.linalg.vector_norm(new, dim=(1, 2))
                    scale = torch.where(new_norm > 0, old_norm / new_norm, torch.ones_like(new_norm))
                else:
                    scale = torch.tensor([group.inv_scale[i][side] for i in rows], dtype=G.dtype).to(group.device)
                new = new * scale[:, None, None]
                _copy_into(grads, list(new.to(grads[0].dtype).unbind(0)))
        return n_layers, sum(len(job[3]) for job in jobs)

    def optimizer_step_work(
        self, optimizer: torch.optim.Optimizer | None = None, check_finite: bool = True, metrics: bool = True
    ) -> dict[str, float]:
        """Fold statistics, refresh due factors, precondition gradients (if enabled); returns the step's metrics.

        ``check_finite`` reads the device's dropped-step flag (a host sync) to warn about
        non-finite statistics; the Lightning hook does so on logging steps only. ``metrics=False``
        skips assembling the returned metrics (an empty dict is returned).
        """
        if self.clip_grad_norm is not None and optimizer is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)  # before preconditioning, as the reference
        self.flush()
        for group in self._groups:
            group.fold(self.ema_decay)
        if check_finite and any([group.take_dropped() for group in self._groups]):
            rank_zero_warn("KFACPreconditioner: non-finite statistics (fp16 overflow?) were dropped since the last check.")
        n_layers = n_grads = 0
        if self.enabled:
            for group in self._groups:
                if group.refresh(self.step, self.update_freq, self.min_samples, self.damping, self.damping_mode,
                                 ema=self.factor_average == "ema"):
                    self._chol_version += 1
            n_layers, n_grads = self._precondition(optimizer)
        if not metrics:
            self.step += 1
            return {}
        conds = [
            group.cond[i][side]
            for group in self._groups
            for i in range(len(group.layers))
            for side in (0, 1)
            if group.has_chol[i][side]
        ]
        self.step += 1
        return {
            "grit/preconditioned_layers": float(n_layers),
            "grit/preconditioned_grads": float(n_grads),
            "grit/factor_cond_max": max(conds) if conds else float("nan"),
        }

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model (layers exist), strategy.setup (on device) and a checkpoint restore
        if self.clip_grad_norm is not None and getattr(trainer, "gradient_clip_val", None):
            rank_zero_warn(
                f"KFACPreconditioner clips gradients to {self.clip_grad_norm} before preconditioning and "
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} clips them again after it; set one of "
                "them to null (GRIT's default: clip_grad_norm here, gradient_clip_val null)."
            )
        self.attach(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None
        self.begin_micro_batch(token_mask_from_batch(batch, self.statistics_tokens), scale, token_shape=shape,
                               slot_dtype=_precision_dtype(trainer))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Runs after backward and AMP unscaling, before clipping and ``optimizer.step`` (module docstring)."""
        # Metrics (and the CUDA syncs that make kfac_ms a true duration, which stall the launch queue)
        # only on the steps Lightning writes to the logger: each self.log costs ~1 ms of host time.
        log_now = is_logging_step(trainer)
        cuda = log_now and any(group.device.type == "cuda" for group in self._groups)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        on_cpu = all(group.device.type == "cpu" for group in self._groups)
        metrics = self.optimizer_step_work(optimizer, check_finite=cuda or on_cpu, metrics=log_now)
        if not log_now:
            return
        if cuda:
            torch.cuda.synchronize()
        metrics["grit/kfac_ms"] = 1000.0 * (time.perf_counter() - t0)
        metrics["grit/kfac_hook_ms"] = 1000.0 * self._hook_seconds
        self._hook_seconds = 0.0
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Statistics (by layer path), cached Cholesky factors, counters: all a resume needs."""
        self.flush()
        if not self._layers and self._pending_state is not None:
            return dict(self._pending_state)  # restored but not attached yet
        layers = {}
        for name, layer in self._layers.items():
            group, i = self._where[name]
            layers[name] = {
                "stats": layer.stats.state_dict(),
                "a": group.side_state(i, 0),
                "g": group.side_state(i, 1),
            }
        return {"version": 2, "step": self.step, "layers": layers}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore now if attached, else at :meth:`attach` (Lightning restores before ``on_fit_start``)."""
        if self._layers:
            self._apply_state(state_dict)
        else:
            self._pending_state = dict(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        saved = state["layers"]
        missing = sorted(set(self._layers) - set(saved))
        extra = sorted(set(saved) - set(self._layers))
        if missing or extra:
            raise ValueError(
                f"K-FAC checkpoint state does not match the model's GRIT layers (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); resume with the same target_modules."
            )
        self.step = int(state["step"])
        for name, layer in self._layers.items():
            entry = saved[name]
            layer.stats.load_state_dict(entry["stats"])
            layer.stats.ema_decay = self.ema_decay
            group, i = self._where[name]
            group.load_side_state(i, 0, entry["a"])
            group.load_side_state(i, 1, entry["g"])
        for group in self._groups:
            group.sync_ema()
        self._chol_version += 1
