"""GRIT's geometry regularisers ("parameter space regularization for geometry preservation"), as gradients.

Two penalties on every GRIT layer y = W x + s B A x (docs/grit.md, "Equations";
u = A x, S_a = E[u u^T] over real tokens, ``layer.stats``):

* **curvature** (weight ``curvature_weight``):
  ``R_c = 1/2 * sum_layers s^2 tr(B S_a B^T) = 1/2 * sum_layers E_tokens ||s B A x||^2``,
  the energy of the adapter's change to the layer output on the training distribution, i.e.
  the update measured in the K-FAC input-side curvature factor instead of the Euclidean
  norm: directions the data excites strongly cost more. Its gradient is applied to B,
  ``dR_c/dB = s^2 B S_a`` (S_a is a data statistic; the gradient with respect to A would
  need the d_in x d_in input covariance, which rank-space K-FAC does not keep).
* **reprojection** (weight ``reprojection_weight``):
  ``R_p = 1/2 * sum_layers (||(I - P_a) A||^2 + ||B (I - P_g)||^2)``, with P_a = V_a V_a^T and
  P_g = V_g V_g^T the projectors onto the subspaces kept by the latest reprojection
  (``layer.subspace``, :mod:`fteval.grit.reprojection`): a soft pull back towards them
  between hard reprojections. ``dR_p/dA = (I - P_a) A``, ``dR_p/dB = B (I - P_g)``. Zero
  until the first reprojection.

Defaults are the weights of the GRIT reference's configuration (lambda_kfac 1e-5 for the
curvature penalty, lambda_reproj 1e-4 for the reprojection penalty, no warm-up); the
penalties' exact form above is fteval's reading of the spec's "parameter space
regularization for geometry preservation" (docs/grit.md). Both weights can ramp linearly
from 0 to their value over ``warmup_steps`` optimizer steps; weights 0 switch a penalty off.
The gradients are added to the loss's before clipping and preconditioning, so the step is a
natural-gradient step on the regularised objective. Hand-written: neither peft nor Lightning
offers penalties defined on K-FAC statistics.
"""

from __future__ import annotations

import torch

from fteval.grit.layer import GritLoraLinear, grit_layers

__all__ = ["GeometryPenalties"]


class GeometryPenalties:
    """Add the gradients of GRIT's curvature and reprojection penalties (module docstring).

    Args:
        curvature_weight: lambda_c >= 0 of ``R_c`` (0 = off; reference 1e-5).
        reprojection_weight: lambda_p >= 0 of ``R_p`` (0 = off; reference 1e-4; > 0 needs a
            reprojection to pull towards).
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
        self._projectors: dict[str, tuple] = {}  # name -> (subspace they come from, P_a, P_g on the device)

    @property
    def active(self) -> bool:
        return self.curvature_weight > 0.0 or self.reprojection_weight > 0.0

    def ramp(self, step: int) -> float:
        """Weight factor at optimizer step ``step``: linear from 0 to 1 over ``warmup_steps``."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def attach(self, model: torch.nn.Module) -> dict[str, GritLoraLinear]:
        """Regularise the GRIT layers of ``model`` (ValueError if it has none)."""
        self._layers = grit_layers(model)
        self._projectors = {}
        if not self._layers:
            raise ValueError(
                "GeometryRegulariser found no GRIT layers: it regularises fteval.models.GRITModule; "
                "remove it from the callbacks of other methods."
            )
        return self._layers

    def _projectors_of(self, name: str, layer: GritLoraLinear) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P_a, P_g) on the layer's device from its kept subspace; computed once per reprojection."""
        kept = layer.subspace
        if kept is None or kept.basis is None:
            return None
        cached = self._projectors.get(name)
        if cached is None or cached[0] is not kept:
            device = layer.lora_A.weight.device
            V_a, V_g = kept.basis["V_a"], kept.basis["V_g"]
            cached = self._projectors[name] = (kept, (V_a @ V_a.T).to(device), (V_g @ V_g.T).to(device))
        return cached[1], cached[2]

    @torch.no_grad()
    def apply(self, step: int) -> dict[str, torch.Tensor]:
        """Add the weighted penalty gradients to ``.grad`` of every GRIT layer; returns the weighted penalties."""
        factor = self.ramp(step)
        lam_c, lam_p = self.curvature_weight * factor, self.reprojection_weight * factor
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
            projectors = self._projectors_of(name, layer) if lam_p > 0.0 else None
            if projectors is not None:
                P_a, P_g = projectors
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
