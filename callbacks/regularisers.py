"""GRIT's geometry regularisers ("parameter space regularization for geometry preservation"), as gradients.

Two penalties on every GRIT layer y = W x + s B A x (docs/grit.md, "Equations";
u = A x, S_a = E[u u^T] over real tokens, kept by :class:`callbacks.kfac.KFACPreconditioner`):

* **curvature** (weight ``curvature_weight``):
  ``R_c = 1/2 * sum_layers s^2 tr(B S_a B^T) = 1/2 * sum_layers E_tokens ||s B A x||^2``,
  the energy of the adapter's change to the layer output on the training distribution, i.e.
  the update measured in the K-FAC input-side curvature factor instead of the Euclidean
  norm: directions the data excites strongly cost more. Its gradient is applied to B,
  ``dR_c/dB = s^2 B S_a`` (S_a is a data statistic; the gradient with respect to A would
  need the d_in x d_in input covariance, which rank-space K-FAC does not keep).
* **reprojection** (weight ``reprojection_weight``):
  ``R_p = 1/2 * sum_layers (||(I - P_a) A||^2 + ||B (I - P_g)||^2)``, with P_a = V_a V_a^T and
  P_g = V_g V_g^T the projectors onto the subspaces kept by the latest
  :class:`callbacks.reprojection.NeuralReprojection` step: a soft pull back towards them
  between hard reprojections. ``dR_p/dA = (I - P_a) A``, ``dR_p/dB = B (I - P_g)``. Zero
  until the first reprojection.

Defaults are the weights of the GRIT reference's configuration (lambda_kfac 1e-5 for the
curvature penalty, lambda_reproj 1e-4 for the reprojection penalty, no warm-up); the
penalties' exact form above is fteval's reading of the spec's "parameter space
regularization for geometry preservation" (docs/grit.md). Both weights can ramp linearly
from 0 to their value over ``warmup_steps`` optimizer steps. Weights 0 switch a penalty off. The gradients are added in ``on_before_optimizer_step``,
so this callback must come *before* ``KFACPreconditioner`` in the callback list: the
preconditioner then sees the gradient of loss + penalties, as a natural-gradient step on the
regularised objective would. The penalties are not part of the logged ``train/loss``; they
are logged as ``grit/reg_curvature`` and ``grit/reg_reprojection`` (weighted values) on
Lightning's logging steps.

Hand-written: neither peft nor Lightning offers penalties defined on K-FAC statistics.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from fteval.models.base import is_logging_step
from fteval.models.grit_layer import GritLoraLinear, grit_layers

__all__ = ["GeometryRegulariser"]


class GeometryRegulariser(L.Callback):
    """Add the gradients of GRIT's curvature and reprojection penalties (module docstring).

    Args:
        curvature_weight: lambda_c >= 0 of ``R_c`` (0 = off; reference 1e-5).
        reprojection_weight: lambda_p >= 0 of ``R_p`` (0 = off; reference 1e-4; > 0 needs
            NeuralReprojection in the trainer's callbacks).
        warmup_steps: optimizer steps over which both weights ramp from 0 (0 = full from the start).
    """

    def __init__(self, curvature_weight: float = 1e-5, reprojection_weight: float = 1e-4, warmup_steps: int = 0) -> None:
        super().__init__()
        for label, value in (("curvature_weight", curvature_weight), ("reprojection_weight", reprojection_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{label} must be a number >= 0 (0 switches it off), got {value!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        self.curvature_weight = float(curvature_weight)
        self.reprojection_weight = float(reprojection_weight)
        self.warmup_steps = warmup_steps
        self._layers: dict[str, GritLoraLinear] = {}
        self._reprojection: Any = None
        self._projectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (P_a, P_g) on the device
        self._projector_period = -1

    @property
    def active(self) -> bool:
        return self.curvature_weight > 0.0 or self.reprojection_weight > 0.0

    def ramp(self, step: int) -> float:
        """Weight factor at optimizer step ``step``: linear from 0 to 1 over ``warmup_steps``."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from callbacks.kfac import KFACPreconditioner
        from callbacks.reprojection import NeuralReprojection

        if not self.active:
            return
        self._layers = grit_layers(pl_module)
        if not self._layers:
            raise ValueError(
                "GeometryRegulariser found no GRIT layers: it regularises fteval.models.GRITModule; "
                "remove it from the callbacks of other methods."
            )
        names = [type(cb).__name__ for cb in trainer.callbacks]
        kfac = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, KFACPreconditioner)]
        mine = trainer.callbacks.index(self)
        if self.curvature_weight > 0.0 and not kfac:
            raise ValueError(
                f"GeometryRegulariser(curvature_weight > 0) needs callbacks.kfac.KFACPreconditioner's statistics; "
                f"the trainer has {names}."
            )
        if kfac and mine > kfac[0]:
            raise ValueError(
                "GeometryRegulariser must come before callbacks.kfac.KFACPreconditioner in trainer.callbacks "
                f"(its gradients are preconditioned with the loss's); the order is {names}."
            )
        self._reprojection = next((cb for cb in trainer.callbacks if isinstance(cb, NeuralReprojection)), None)
        if self.reprojection_weight > 0.0 and self._reprojection is None:
            raise ValueError(
                "GeometryRegulariser(reprojection_weight > 0) pulls towards the subspaces of "
                f"callbacks.reprojection.NeuralReprojection, which is not among the callbacks {names}."
            )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.active:
            return
        values = self.apply(trainer.global_step, getattr(self._reprojection, "period", None))
        if is_logging_step(trainer):
            for key, value in values.items():
                pl_module.log(key, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ the work
    def _refresh_projectors(self, period: Any) -> None:
        """(P_a, P_g) per layer from the reprojection callback's latest bases, cached per reprojection."""
        if self._reprojection is None or period == self._projector_period:
            return
        self._projector_period = period
        self._projectors = {}
        for name, (V_a, V_g) in self._reprojection.subspaces().items():
            layer = self._layers.get(name)
            if layer is None:
                continue
            device = layer.lora_A.weight.device
            self._projectors[name] = ((V_a @ V_a.T).to(device), (V_g @ V_g.T).to(device))

    @torch.no_grad()
    def apply(self, step: int, period: Any = None) -> dict[str, torch.Tensor]:
        """Add the weighted penalty gradients to ``.grad`` of every GRIT layer; returns the weighted penalties."""
        factor = self.ramp(step)
        lam_c, lam_p = self.curvature_weight * factor, self.reprojection_weight * factor
        if lam_p > 0.0:
            self._refresh_projectors(period)
        curv: list[torch.Tensor] = []
        proj: list[torch.Tensor] = []
        for name, layer in self._layers.items():
            A, B = layer.lora_A.weight, layer.lora_B.weight  # [r, in], [out, r]
            if lam_c > 0.0 and layer.stats is not None:  # S_a = 0 before any statistics: no penalty
                S_a = layer.stats.S_a.to(B.dtype)  # [r, r]
                BS = B @ S_a  # [out, r]
                s2 = layer.scaling**2
                curv.append(0.5 * s2 * (BS * B).sum())
                _add_grad(B, lam_c * s2 * BS)
            if lam_p > 0.0 and name in self._projectors:
                P_a, P_g = self._projectors[name]
                rA = A - P_a.to(A.dtype) @ A  # (I - P_a) A
                rB = B - B @ P_g.to(B.dtype)  # B (I - P_g)
                proj.append(0.5 * ((rA * rA).sum() + (rB * rB).sum()))
                _add_grad(A, lam_p * rA)
                _add_grad(B, lam_p * rB)
        out: dict[str, torch.Tensor] = {}
        if curv:
            out["grit/reg_curvature"] = lam_c * torch.stack(curv).sum()
        if proj:
            out["grit/reg_reprojection"] = lam_p * torch.stack(proj).sum()
        return out


def _add_grad(param: torch.Tensor, g: torch.Tensor) -> None:
    if param.grad is None:
        param.grad = g.to(param.dtype).clone()
    else:
        param.grad.add_(g.to(param.grad.dtype))
