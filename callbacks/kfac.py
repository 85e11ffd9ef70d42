"""K-FAC natural-gradient preconditioning of GRIT's LoRA factors, as a Lightning callback.

Statistics: hooks on every :class:`~fteval.models.grit_layer.GritLoraLinear` record the
rank-space factors S_a = E[u u^T] (u = A x) and S_g = E[v v^T] (v = B^T dL/dy) in fp32 on
``layer.stats`` (a :class:`~fteval.models.grit_layer.RankSpaceStats`), over real tokens only.

Which factor preconditions which gradient (``pairing``), with M_a = S_a + l_a I, M_g = S_g + l_g I:

* ``"kfac"`` (default): textbook K-FAC restricted to the r x r factors. B's input is u, so
  dB <- dB M_a^-1; A's output-side gradient is (scaling x) v, so dA <- M_g^-1 dA. This is
  the Kronecker block of the Fisher for each factor with the large (d_out or d_in) side
  left as identity; chosen as default because it is the one K-FAC derives.
* ``"grit"``: the pairing of the GRIT reference code (arXiv 2601.00231):
  dB <- dB M_g^-1, dA <- M_a^-1 dA.

Both are descent directions (a symmetric positive definite matrix on one side).

Damping: ``"trace"`` (default) uses l = damping * tr(S) / r, so the damping is relative to
the factor's mean eigenvalue; S_g starts at exactly 0 (B = 0) and stays tiny with
mean-reduced losses, where an absolute 1e-2 would swamp it (ARCHITECTURE.md, pitfalls).
``"absolute"`` uses l = damping. A side is used once it has ``min_samples`` tokens and a
positive finite trace (S_g is exactly 0 while B = 0: that side is then left as is).

Scale: K-FAC inverses have units 1/S, and S_g's magnitude depends on the loss reduction
(mean over tokens, gradient accumulation), so the raw preconditioned gradient's size is
arbitrary. ``preserve_grad_norm=True`` (default) rescales each preconditioned gradient
tensor to its original norm: the preconditioner changes the direction, the learning rate
keeps its meaning (and gradient clipping, which runs after this hook, sees the usual norms).

Hook placement (Lightning 2.6, verified in lightning/pytorch/plugins/precision/precision.py
and amp.py): ``optimizer.step(closure)`` runs the closure (training_step + backward), then
``Precision._after_closure`` calls the callbacks' ``on_before_optimizer_step``, then
``_clip_gradients``; only after that does the optimizer update the parameters. Under fp16
AMP, ``MixedPrecision.optimizer_step`` calls ``scaler.unscale_(optimizer)`` *before*
``_after_closure``. So :meth:`on_before_optimizer_step` sees whole (accumulated), unscaled
gradients, before clipping and before the step: the place where editing ``.grad`` counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fteval.models.grit_layer import GritLoraLinear, RankSpaceStats, grit_layers

__all__ = ["KFACPreconditioner", "token_mask_from_batch"]

_PAIRINGS = ("kfac", "grit")
_DAMPING_MODES = ("trace", "absolute")


def token_mask_from_batch(batch: Any) -> torch.Tensor | None:
    """Real-token mask ``[batch, seq]`` (bool) aligned with the model's positions, or None.

    HF causal-LM convention: ``labels`` equal ``input_ids`` with -100 where no loss is
    taken, and position t's output predicts ``labels[t + 1]``; so position t is real when
    ``labels[:, t + 1] != -100`` (the last position predicts nothing). Without labels,
    ``attention_mask`` marks the real tokens; without either, None (all tokens count).
    """
    if not isinstance(batch, Mapping):
        return None
    labels = batch.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2:
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != -100
        return mask
    attention = batch.get("attention_mask")
    if isinstance(attention, torch.Tensor) and attention.dim() == 2:
        return attention.bool()
    return None


class _Side:
    """Cached damped factor of one side: Cholesky L of M / c, with M = S + l I and c = 1/inv_scale."""

    __slots__ = ("chol", "inv_scale", "cond", "refreshed_at")

    def __init__(self) -> None:
        self.chol: torch.Tensor | None = None  # [r, r] lower-triangular, fp32
        self.inv_scale = 1.0  # M^-1 = inv_scale * (L L^T)^-1
        self.cond = float("nan")  # condition number of M
        self.refreshed_at = -1  # optimizer step of the last refresh, -1 = never

    def state_dict(self) -> dict[str, Any]:
        return {
            "chol": None if self.chol is None else self.chol.detach().cpu().clone(),
            "inv_scale": self.inv_scale,
            "cond": self.cond,
            "refreshed_at": self.refreshed_at,
        }

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        self.chol = None if state["chol"] is None else state["chol"].to(device)
        self.inv_scale = float(state["inv_scale"])
        self.cond = float(state["cond"])
        self.refreshed_at = int(state["refreshed_at"])


def damped_cholesky(
    S: torch.Tensor, damping: float, damping_mode: str
) -> tuple[torch.Tensor, float, float] | None:
    """Cholesky factor of the damped factor, in fp32: S ``[r, r]`` -> (L, inv_scale, cond) or None.

    ``trace`` mode factorises the normalised M / c = S / c + damping I with c = tr(S)/r
    (well scaled even when S ~ 1e-20) and returns inv_scale = 1/c, so that
    (S + damping c I)^-1 = inv_scale (L L^T)^-1; ``absolute`` factorises S + damping I.
    None when the trace is not positive and finite or the factorisation fails.
    """
    S = S.float()
    r = S.shape[0]
    tr = float(torch.trace(S))
    if not (tr > 0.0 and math.isfinite(tr)):
        return None
    eye = torch.eye(r, dtype=S.dtype, device=S.device)
    if damping_mode == "trace":
        c = tr / r
        M, inv_scale = S / c + damping * eye, 1.0 / c
    else:
        M, inv_scale = S + damping * eye, 1.0
    M = 0.5 * (M + M.T)
    chol, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0:
        return None
    ev = torch.linalg.eigvalsh(M)
    cond = float(ev[-1] / ev[0]) if float(ev[0]) > 0 else float("inf")
    return chol, inv_scale, cond


class KFACPreconditioner(L.Callback):
    """Rank-space K-FAC preconditioning of every GRIT layer's lora_A/lora_B gradient.

    Args:
        ema_decay: beta of the factors' EMA (after a side's first refresh; running mean before).
        update_freq: optimizer steps between refreshes of the cached Cholesky factors
            (statistics accumulate every step).
        damping: lambda; relative to tr(S)/r or absolute, see ``damping_mode``.
        damping_mode: ``"trace"`` or ``"absolute"`` (module docstring).
        min_samples: real tokens a factor needs before it is used; until then that side's
            gradient is left unpreconditioned.
        pairing: ``"kfac"`` (textbook, default) or ``"grit"`` (reference code), module docstring.
        preserve_grad_norm: rescale each preconditioned gradient tensor to its original norm.
        enabled: False keeps collecting statistics (the reprojection callback and the
            artifacts use them) but never touches a gradient: plain LoRA, for ablations.

    Logged per optimizer step: ``grit/preconditioned_layers`` (layers with at least one
    preconditioned gradient this step), ``grit/preconditioned_grads`` (tensors),
    ``grit/factor_cond_max`` (largest condition number of the cached damped factors),
    ``grit/kfac_ms`` (time in this hook, CUDA-synchronised) and ``grit/kfac_hook_ms`` (host
    time spent in the statistics hooks since the previous step; on GPU that is launch
    time, the kernels overlap with the forward/backward).

    Under DDP the per-step statistics (sums and token counts) are all-reduced before they
    are folded, so every rank holds identical factors and preconditions identically.
    Only DDP-style strategies (full parameters on every rank) are supported.
    """

    def __init__(
        self,
        ema_decay: float = 0.95,
        update_freq: int = 20,
        damping: float = 1e-2,
        damping_mode: str = "trace",
        min_samples: int = 128,
        pairing: str = "kfac",
        preserve_grad_norm: bool = True,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if pairing not in _PAIRINGS:
            raise ValueError(f"pairing must be one of {_PAIRINGS}, got {pairing!r}.")
        if damping_mode not in _DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {_DAMPING_MODES}, got {damping_mode!r}.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
            raise ValueError(f"update_freq must be a positive integer (optimizer steps), got {update_freq!r}.")
        if not damping > 0.0:
            raise ValueError(f"damping must be > 0, got {damping!r}.")
        if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
            raise ValueError(f"min_samples must be a positive integer (tokens), got {min_samples!r}.")
        self.ema_decay = float(ema_decay)
        self.update_freq = update_freq
        self.damping = float(damping)
        self.damping_mode = damping_mode
        self.min_samples = min_samples
        self.pairing = pairing
        self.preserve_grad_norm = bool(preserve_grad_norm)
        self.enabled = bool(enabled)

        self.step = 0  # optimizer steps processed by this callback
        self._layers: dict[str, GritLoraLinear] = {}
        self._sides: dict[str, dict[str, _Side]] = {}
        self._handles: list[Any] = []
        self._mask: torch.Tensor | None = None  # [batch, seq] bool for the current micro-batch
        self._mask_on: dict[torch.device, torch.Tensor] = {}
        self._mask_warned = False
        self._grad_scale = 1.0  # AMP loss scale of the current micro-batch
        self._hook_seconds = 0.0
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: torch.nn.Module) -> dict[str, GritLoraLinear]:
        """Create ``layer.stats`` on every GRIT layer of ``model`` and register the statistics hooks."""
        self.detach()
        layers = grit_layers(model)
        if not layers:
            raise ValueError(
                f"KFACPreconditioner found no GritLoraLinear in {type(model).__name__}: inject GRIT layers with "
                "fteval.models.grit_layer.inject_grit_layers (GRITModule does so in configure_model)."
            )
        self._layers = layers
        for name, layer in layers.items():
            if layer.stats is None or layer.stats.rank != layer.r:
                layer.stats = RankSpaceStats(layer.r, layer.lora_A.weight.device, self.ema_decay)
            self._sides.setdefault(name, {"a": _Side(), "g": _Side()})
            self._handles.append(layer.lora_A.register_forward_hook(self._make_hook(layer)))
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._apply_state(state)
        return layers

    def detach(self) -> None:
        """Remove the hooks (statistics stay on the layers)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, layer: GritLoraLinear):
        def hook(module: torch.nn.Module, inputs: Any, u: torch.Tensor) -> None:
            st = layer.stats
            if st is None or st.counted or not layer.training or not torch.is_grad_enabled():
                return
            t0 = time.perf_counter()
            st.counted = True  # gradient checkpointing re-runs this forward: count it once
            mask = self._mask_for(u)
            st.add_a(u.detach(), mask)
            if u.requires_grad:
                # dL/du = scaling * v * (AMP loss scale): divide both out (RankSpaceStats docstring).
                divisor = layer.scaling * self._grad_scale

                def grad_hook(grad: torch.Tensor) -> None:
                    t1 = time.perf_counter()
                    st.add_g(grad.detach().float() / divisor, mask)
                    self._hook_seconds += time.perf_counter() - t1

                u.register_hook(grad_hook)
            self._hook_seconds += time.perf_counter() - t0

        return hook

    def _mask_for(self, u: torch.Tensor) -> torch.Tensor | None:
        mask = self._mask
        if mask is None:
            return None
        if tuple(u.shape[:-1]) != tuple(mask.shape):
            if not self._mask_warned:
                rank_zero_warn(
                    f"KFACPreconditioner: token mask of shape {tuple(mask.shape)} does not match GRIT activations "
                    f"{tuple(u.shape)}; statistics use all tokens for such layers."
                )
                self._mask_warned = True
            return None
        m = self._mask_on.get(u.device)
        if m is None:
            m = self._mask_on[u.device] = mask.to(u.device, non_blocking=True)
        return m

    def begin_micro_batch(self, token_mask: torch.Tensor | None, grad_scale: float = 1.0) -> None:
        """Start a micro-batch: its real-token mask ``[batch, seq]`` and AMP loss scale; re-arm the layers."""
        self._mask = None if token_mask is None else token_mask.bool()
        self._mask_on = {}
        self._grad_scale = float(grad_scale)
        for layer in self._layers.values():
            if layer.stats is not None:
                layer.stats.counted = False

    # ------------------------------------------------------------------ the optimizer-step work
    def _fold(self) -> None:
        """All-reduce (DDP) and fold every layer's pending statistics; one host transfer for all counts."""
        stats = [layer.stats for layer in self._layers.values() if layer.stats is not None]
        if not stats:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                sums = [t for st in stats for t in (st.sum_a, st.sum_g)]
                cnts = [t for st in stats for t in (st.cnt_a, st.cnt_g)]
                flat_s = torch.cat([t.reshape(-1) for t in sums])
                flat_c = torch.stack(cnts)
                torch.distributed.all_reduce(flat_s)
                torch.distributed.all_reduce(flat_c)
                offset = 0
                for t in sums:
                    t.copy_(flat_s[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
                for t, c in zip(cnts, flat_c):
                    t.copy_(c)
        info = torch.stack(
            [
                x
                for st in stats
                for x in (
                    st.cnt_a.double(),
                    st.cnt_g.double(),
                    torch.isfinite(st.sum_a).all().double(),
                    torch.isfinite(st.sum_g).all().double(),
                )
            ]
        ).tolist()
        for i, st in enumerate(stats):
            ca, cg, fa, fg = info[4 * i : 4 * i + 4]
            if (ca > 0 and not fa) or (cg > 0 and not fg):
                rank_zero_warn("KFACPreconditioner: non-finite statistics this step (fp16 overflow?) were dropped.")
            st.fold(int(ca), int(cg), bool(fa), bool(fg))

    def _refresh(self) -> None:
        """Re-factorise each side that is ready and due (never factorised, or ``update_freq`` steps old)."""
        for name, layer in self._layers.items():
            st = layer.stats
            if st is None:
                continue
            for side in ("a", "g"):
                cache = self._sides[name][side]
                n = st.n_a if side == "a" else st.n_g
                due = cache.chol is None or self.step - cache.refreshed_at >= self.update_freq
                if n < self.min_samples or not due:
                    continue
                out = damped_cholesky(st.S_a if side == "a" else st.S_g, self.damping, self.damping_mode)
                if out is None:
                    continue  # degenerate (e.g. S_g while B == 0): keep the previous cache, if any
                cache.chol, cache.inv_scale, cache.cond = out
                cache.refreshed_at = self.step
                setattr(st, f"ema_{side}", True)  # running mean until the first refresh, EMA after

    def _precondition(self, optimizer: torch.optim.Optimizer | None) -> tuple[int, int]:
        """Apply the cached inverses to lora_A/lora_B ``.grad`` in place; returns (layers, tensors) done."""
        in_opt: set[int] | None = None
        if optimizer is not None:
            in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        side_of_B, side_of_A = ("a", "g") if self.pairing == "kfac" else ("g", "a")
        n_layers = n_grads = 0
        with torch.no_grad():
            for name, layer in self._layers.items():
                sides = self._sides[name]
                done = 0
                for param, side, right in ((layer.lora_B.weight, side_of_B, True), (layer.lora_A.weight, side_of_A, False)):
                    cache = sides[side]
                    if param.grad is None or cache.chol is None or (in_opt is not None and id(param) not in in_opt):
                        continue
                    g = param.grad.float()  # B: [out, r] (right-multiplied), A: [r, in] (left-multiplied)
                    if right:
                        new = torch.cholesky_solve(g.T.contiguous(), cache.chol).T  # g M^-1 (M symmetric)
                    else:
                        new = torch.cholesky_solve(g, cache.chol)  # M^-1 g
                    if self.preserve_grad_norm:
                        norm_new = new.norm()
                        new = new * torch.where(norm_new > 0, g.norm() / norm_new, torch.ones_like(norm_new))
                    else:
                        new = new * cache.inv_scale
                    param.grad.copy_(new.to(param.grad.dtype))
                    done += 1
                n_grads += done
                n_layers += int(done > 0)
        return n_layers, n_grads

    def optimizer_step_work(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Fold statistics, refresh due factors, precondition gradients (if enabled); returns the step's metrics."""
        self._fold()
        n_layers = n_grads = 0
        if self.enabled:
            self._refresh()
            n_layers, n_grads = self._precondition(optimizer)
        conds = [s.cond for sides in self._sides.values() for s in sides.values() if s.chol is not None]
        self.step += 1
        return {
            "grit/preconditioned_layers": float(n_layers),
            "grit/preconditioned_grads": float(n_grads),
            "grit/factor_cond_max": max(conds) if conds else float("nan"),
        }

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model (layers exist), strategy.setup (on device) and a checkpoint restore
        self.attach(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.detach()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        self.begin_micro_batch(token_mask_from_batch(batch), scale)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Runs after backward and AMP unscaling, before clipping and ``optimizer.step`` (module docstring)."""
        cuda = any(layer.lora_A.weight.is_cuda for layer in self._layers.values())
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = self.optimizer_step_work(optimizer)
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
        if not self._layers and self._pending_state is not None:
            return dict(self._pending_state)  # restored but not attached yet
        return {
            "version": 1,
            "step": self.step,
            "layers": {
                name: {
                    "stats": None if layer.stats is None else layer.stats.state_dict(),
                    "a": self._sides[name]["a"].state_dict(),
                    "g": self._sides[name]["g"].state_dict(),
                }
                for name, layer in self._layers.items()
            },
        }

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
            if entry["stats"] is not None and layer.stats is not None:
                layer.stats.load_state_dict(entry["stats"])
            device = layer.lora_A.weight.device
            self._sides[name]["a"].load_state_dict(entry["a"], device)
            self._sides[name]["g"].load_state_dict(entry["g"], device)
