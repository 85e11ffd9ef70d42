"""GRIT's geometry regularisers ("parameter space regularization for geometry preservation"), as gradients.

Two penalties on every GRIT layer y = W x + s B A x (docs/grit.md, "Equations"; u = A x,
v = B^T dL/dy, S_a = E[u u^T] and S_g = E[v v^T] over the counted tokens, ``layer.stats``;
P_a = V_a V_a^T and P_g = V_g V_g^T the projectors onto the subspaces kept by the latest
reprojection, ``layer.subspace``). Two forms:

* ``form="reference"`` (default; the GRIT reference code's penalties, arXiv 2601.00231):

  - curvature (weight ``curvature_weight``): ``R_c = sum_layers tr(A^T S_a A) + tr(B S_g B^T)``,
    each factor measured in the curvature of its own side; ``dR_c/dA = 2 S_a A``,
    ``dR_c/dB = 2 B S_g``;
  - reprojection (weight ``reprojection_weight``):
    ``R_p = sum_layers ||(I - P_a) A||^2 + ||B (I - P_g)||^2``; ``dR_p/dA = 2 (I - P_a) A``,
    ``dR_p/dB = 2 B (I - P_g)``.

* ``form="energy"`` (fteval variant): ``R_c = 1/2 sum_layers s^2 tr(B S_a B^T) =
  1/2 sum_layers E_tokens ||s B A x||^2``, the energy of the adapter's change to the layer output,
  with ``dR_c/dB = s^2 B S_a`` and no gradient on A; ``R_p`` as above with a factor 1/2
  (gradients ``(I - P_a) A`` and ``B (I - P_g)``).

The reprojection penalty is zero until the first reprojection (the reference pulls towards the
top eigenvectors of the current factors before then). The weights default to the reference's
configuration (lambda_kfac 1e-5, lambda_reproj 1e-4, no warm-up); both can ramp linearly from 0
over ``warmup_steps`` optimizer steps, and weights 0 switch a penalty off. The gradients are added
to the loss's before clipping and preconditioning, so the step is a natural-gradient step on the
regularised objective. Hand-written: neither peft nor Lightning offers penalties defined on
K-FAC statistics.
"""

from __future__ import annotations

import torch

from fteval.grit.layer import GritLoraLinear, grit_layers

__all__ = ["PENALTY_FORMS", "GeometryPenalties"]

PENALTY_FORMS = ("reference", "energy")


class GeometryPenalties:
    """Add the gradients of GRIT's curvature and reprojection penalties (module docstring).

    Args:
        curvature_weight: lambda_c >= 0 of ``R_c`` (0 = off; reference 1e-5).
        reprojection_weight: lambda_p >= 0 of ``R_p`` (0 = off; reference 1e-4; > 0 needs a
            reprojection to pull towards).
        warmup_steps: optimizer steps over which both weights ramp from 0 (0 = full from the start).
        form: ``"reference"`` (the reference's penalties on both factors) or ``"energy"``
            (fteval variant: the output energy on B), see the module docstring.
    """

    def __init__(self, curvature_weight: float = 1e-5, reprojection_weight: float = 1e-4, warmup_steps: int = 0,
                 form: str = "reference") -> None:
        super().__init__()
        if form not in PENALTY_FORMS:
            raise ValueError(f"form must be one of {PENALTY_FORMS}, got {form!r}.")
        for label, value in (("curvature_weight", curvature_weight), ("reprojection_weight", reprojection_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0.0:
                raise ValueError(f"{label} must be a number >= 0 (0 switches it off), got {value!r}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
        self.curvature_weight = float(curvature_weight)
        self.reprojection_weight = float(reprojection_weight)
        self.warmup_steps = warmup_steps
        self.form = form
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
                "GeometryPenalties found no GRIT layers: it regularises the layers of fteval.grit.inject_grit_layers "
                "(fteval.models.GRITModule); remove it from other methods' configs."
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
        reference = self.form == "reference"
        for name, layer in self._layers.items():
            A, B = layer.lora_A.weight, layer.lora_B.weight  # [r, in], [out, r]
            if lam_c > 0.0 and layer.stats is not None:  # S = 0 before any statistics: no penalty
                if reference:
                    SA = layer.stats.S_a.to(A.dtype) @ A  # [r, in]
                    BS = B @ layer.stats.S_g.to(B.dtype)  # [out, r]
                    curv.append((SA * A).sum() + (BS * B).sum())
                    _add_grad(A, 2.0 * lam_c * SA)
                    _add_grad(B, 2.0 * lam_c * BS)
                else:
                    BS = B @ layer.stats.S_a.to(B.dtype)  # [out, r]
                    s2 = layer.scaling**2
                    curv.append(0.5 * s2 * (BS * B).sum())
                    _add_grad(B, lam_c * s2 * BS)
            projectors = self._projectors_of(name, layer) if lam_p > 0.0 else None
            if projectors is not None:
                P_a, P_g = projectors
                rA = A - P_a.to(A.dtype) @ A  # (I - P_a) A
                rB = B - B @ P_g.to(B.dtype)  # B (I - P_g)
                half = 1.0 if reference else 0.5
                proj.append(half * ((rA * rA).sum() + (rB * rB).sum()))
                _add_grad(A, 2.0 * half * lam_p * rA)
                _add_grad(B, 2.0 * half * lam_p * rB)
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
