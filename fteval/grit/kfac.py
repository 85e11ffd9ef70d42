"""Rank-space K-FAC of GRIT's layers without Lightning: settings, attaching the statistics to a model,
the work of one optimizer step (clip, fold, refresh, precondition), and its checkpoint state.

:class:`KFAC` ties together :mod:`~fteval.grit.capture` (statistics during forward and backward),
:mod:`~fteval.grit.stats` (factors) and :mod:`~fteval.grit.solve` (damped solves). The equations,
every default and where it comes from (the spec, the GRIT reference code of arXiv 2601.00231, or
fteval) are in docs/grit.md; the defaults are GRIT's, fteval's variants are named options.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from fteval.grit.capture import STATISTICS_TOKENS, StatisticsCapture
from fteval.grit.layer import GritLoraLinear, LayerState, grit_layers
from fteval.grit.solve import DAMPING_MODES, PAIRINGS, clip_gradients, plan_preconditioning, precondition
from fteval.grit.stats import FactorGroup

__all__ = ["CLIP_STAGES", "FACTOR_AVERAGES", "INVERSE_TIMINGS", "KFAC"]

FACTOR_AVERAGES = ("ema", "mean")
INVERSE_TIMINGS = ("same_step", "previous_step")
CLIP_STAGES = ("before", "after")


class KFAC(LayerState):
    """Rank-space K-FAC preconditioning of every GRIT layer's lora_A/lora_B gradient.

    Args (defaults are GRIT's: the spec's values, the reference's where the spec is silent;
    docs/grit.md says which is which):
        ema_decay: beta of the factors' EMA (spec: momentum 0.95), used once a side has been
            factorised (running mean before).
        update_freq: optimizer steps between refreshes of the cached Cholesky factors
            (spec: 20; statistics accumulate every step).
        damping: lambda (spec: 1e-2); absolute or relative to tr(S)/r, see ``damping_mode``.
        damping_mode: ``"absolute"`` (reference) or ``"trace"`` (fteval variant), see
            :mod:`fteval.grit.solve`. A side is used once it has ``min_samples`` tokens and a
            positive finite trace (S_g is exactly 0 while B = 0: that side is then left as is).
        min_samples: real tokens a factor needs before it is used; until then that side's
            gradient is left unpreconditioned.
        pairing: ``"grit"`` (reference) or ``"kfac"`` (textbook, fteval variant), see
            :mod:`fteval.grit.solve`.
        preserve_grad_norm: rescale each preconditioned gradient tensor to its original norm
            (fteval variant; the reference keeps the preconditioned magnitude).
        clip_grad_norm: clip the global norm of the optimizer's gradients to this value
            *before* preconditioning (the reference's order under transformers' Trainer; the
            value is the same 1.0 as QLoRA's clipping, where the reference's examples use 1.5:
            docs/grit.md); None: no clipping here. Runs even with ``enabled=False``.
        clip_stage: ``"before"`` preconditioning (the reference's order) or ``"after"`` it (the
            preconditioned gradients are clipped; fteval variant).
        factor_average: ``"ema"`` (spec: momentum-based updates) or ``"mean"`` (cumulative
            token-weighted mean throughout, the reference's averaging).
        statistics_tokens: ``"loss"`` (positions that predict a loss token; fteval's choice:
            the Fisher of the trained objective), ``"all"`` (every non-padding position) or
            ``"every"`` (every position, padding included, as the reference's hooks record).
        inverse_timing: ``"same_step"`` (fold this step's statistics, refresh, then
            precondition with them) or ``"previous_step"`` (the reference's: precondition with
            the factors of the previous refresh, then fold and refresh; the first step is not
            preconditioned).
        enabled: False keeps collecting statistics (the reprojection and the artifacts use
            them) but never preconditions a gradient: plain LoRA, for ablations.

    Under DDP the per-step statistics (sums and token counts) are all-reduced before they
    are folded, so every rank holds identical factors and preconditions identically.
    Only DDP-style strategies (full parameters on every rank) are supported.
    """

    _warn = staticmethod(warnings.warn)  # how problems are reported (the Lightning callback: rank zero only)

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
        clip_stage: str = "before",
        factor_average: str = "ema",
        statistics_tokens: str = "loss",
        inverse_timing: str = "same_step",
        enabled: bool = True,
    ) -> None:
        super().__init__()
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}.")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}.")
        if factor_average not in FACTOR_AVERAGES:
            raise ValueError(f"factor_average must be one of {FACTOR_AVERAGES}, got {factor_average!r}.")
        if statistics_tokens not in STATISTICS_TOKENS:
            raise ValueError(f"statistics_tokens must be one of {STATISTICS_TOKENS}, got {statistics_tokens!r}.")
        if clip_stage not in CLIP_STAGES:
            raise ValueError(f"clip_stage must be one of {CLIP_STAGES}, got {clip_stage!r}.")
        if inverse_timing not in INVERSE_TIMINGS:
            raise ValueError(f"inverse_timing must be one of {INVERSE_TIMINGS}, got {inverse_timing!r}.")
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
        self.clip_stage = clip_stage
        self.factor_average = factor_average
        self.statistics_tokens = statistics_tokens
        self.inverse_timing = inverse_timing
        self.enabled = bool(enabled)

        self.step = 0  # optimizer steps processed
        self.capture = StatisticsCapture(warn=self._warn)
        self._layers: dict[str, GritLoraLinear] = {}
        self._groups: list[FactorGroup] = []
        self._where: dict[str, tuple[FactorGroup, int]] = {}  # layer path -> (group, row)
        self._chol_version = 0  # bumped when a refresh or a restore changes the cached factors
        self._plan_cache: tuple | None = None
        self._adapter_params: list[torch.Tensor] | None = None  # lora_A/lora_B weights of every layer, in order

    # ------------------------------------------------------------------ attach / detach
    def attach(self, model: torch.nn.Module) -> dict[str, GritLoraLinear]:
        """Give every GRIT layer of ``model`` its statistics (``layer.stats``) and make it report them here."""
        self.detach()
        layers = grit_layers(model)
        if not layers:
            raise ValueError(
                f"KFAC found no GritLoraLinear in {type(model).__name__}: inject GRIT layers with "
                "fteval.grit.inject_grit_layers (GRITModule does so in configure_model)."
            )
        self._layers = layers
        by_key: dict[tuple[torch.device, int], list[str]] = {}
        for name, layer in layers.items():
            by_key.setdefault((layer.lora_A.weight.device, layer.r), []).append(name)
        self._groups, self._where = [], {}
        self._plan_cache, self._adapter_params = None, None
        for (_, rank), names in by_key.items():
            group = FactorGroup(names, [layers[n] for n in names], rank, self.ema_decay)
            self._groups.append(group)
            self._where.update({n: (group, i) for i, n in enumerate(names)})
        self.capture.attach(self._groups)
        self._restore_pending()
        return layers

    def detach(self) -> None:
        """Stop recording statistics (they stay on the layers)."""
        self.capture.detach()

    @property
    def groups(self) -> list[FactorGroup]:
        """The attached layers' factor groups, one per (device, rank)."""
        return list(self._groups)

    def begin_micro_batch(self, *args: Any, **kwargs: Any) -> None:
        """Start a micro-batch: :meth:`fteval.grit.capture.StatisticsCapture.begin_micro_batch`."""
        self.capture.begin_micro_batch(*args, **kwargs)

    def flush(self) -> None:
        """Add the statistics recorded so far to the pending sums (:meth:`StatisticsCapture.flush`)."""
        self.capture.flush()

    # ------------------------------------------------------------------ the optimizer-step work
    def optimizer_step_work(
        self, optimizer: torch.optim.Optimizer | None = None, check_finite: bool = True, metrics: bool = True
    ) -> dict[str, float]:
        """One optimizer step's K-FAC work on whole gradients, in GRIT's order; returns the step's metrics.

        1. clip the global norm of the optimizer's gradients (``clip_grad_norm``), as the reference does
           before preconditioning;
        2. add the recorded statistics and fold them into the factors;
        3. refresh the due damped factors and precondition the adapter gradients (if ``enabled``).

        With ``clip_stage="after"`` the clip moves to the end. With ``inverse_timing="previous_step"``
        the gradients are preconditioned between 1 and 2, with the factors cached by the previous
        steps' refreshes. ``check_finite`` reads the
        device's dropped-step flag (a host sync) to warn about non-finite statistics.
        ``metrics=False`` skips assembling the metrics (an empty dict is returned):
        ``grit/preconditioned_layers`` (layers with at least one preconditioned gradient),
        ``grit/preconditioned_grads`` (tensors) and ``grit/factor_cond_max`` (largest condition
        number of the cached damped factors).
        """
        clip = self.clip_grad_norm is not None and optimizer is not None
        if clip and self.clip_stage == "before":
            clip_gradients(optimizer, self.clip_grad_norm)
        n_layers = n_grads = 0
        previous = self.enabled and self.inverse_timing == "previous_step"
        if previous:
            jobs, n_layers = self._plan(optimizer)
            n_grads = precondition(jobs, self.preserve_grad_norm)
        self.flush()
        for group in self._groups:
            group.fold(self.ema_decay)
        if check_finite and any([group.take_dropped() for group in self._groups]):
            self._warn("KFAC: non-finite statistics (fp16 overflow?) were dropped since the last check.")
        if self.enabled:
            for group in self._groups:
                if group.refresh(self.step, self.update_freq, self.min_samples, self.damping, self.damping_mode,
                                 ema=self.factor_average == "ema"):
                    self._chol_version += 1
            if not previous:
                jobs, n_layers = self._plan(optimizer)
                n_grads = precondition(jobs, self.preserve_grad_norm)
        if clip and self.clip_stage == "after":
            clip_gradients(optimizer, self.clip_grad_norm)
        self.step += 1
        if not metrics:
            return {}
        conds = [c for group in self._groups for c in group.conds()]
        return {
            "grit/preconditioned_layers": float(n_layers),
            "grit/preconditioned_grads": float(n_grads),
            "grit/factor_cond_max": max(conds) if conds else float("nan"),
        }

    def _plan(self, optimizer: torch.optim.Optimizer | None) -> tuple[list[tuple], int]:
        """:func:`fteval.grit.solve.plan_preconditioning`, cached until a refresh changes which sides have
        factors, the optimizer changes, or a gradient appears or disappears (planning walks every layer)."""
        if self._adapter_params is None:
            self._adapter_params = [
                p for group in self._groups for layer in group.layers for p in (layer.lora_A.weight, layer.lora_B.weight)
            ]
        grads_present = tuple(p.grad is not None for p in self._adapter_params)
        key = (self._chol_version, id(optimizer), grads_present)
        if self._plan_cache is not None and self._plan_cache[0] == key:
            return self._plan_cache[1], self._plan_cache[2]
        in_optimizer = None
        if optimizer is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        jobs, n_layers = plan_preconditioning(self._groups, self.pairing, in_optimizer)
        self._plan_cache = (key, jobs, n_layers)
        return jobs, n_layers

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Statistics (by layer path), cached Cholesky factors, counters: all a resume needs."""
        self.flush()
        return super().state_dict()

    def _state(self) -> dict[str, Any]:
        layers = {}
        for name, layer in self._layers.items():
            group, i = self._where[name]
            layers[name] = {
                "stats": layer.stats.state_dict(),
                "a": group.side_state(i, 0),
                "g": group.side_state(i, 1),
            }
        return {"version": 2, "step": self.step, "layers": layers}

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
