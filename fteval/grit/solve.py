"""Damped factor solves and the preconditioning of GRIT's adapter gradients, with global-norm clipping.

With M_a = S_a + l I and M_g = S_g + l I (:func:`damped_cholesky`), ``pairing`` decides which factor
preconditions which gradient:

* ``"grit"`` (default, the reference's pairing): dB <- dB M_g^-1, dA <- M_a^-1 dA.
* ``"kfac"``: textbook K-FAC restricted to the r x r factors. B's input is u, so
  dB <- dB M_a^-1; A's output-side gradient is (scaling x) v, so dA <- M_g^-1 dA: the
  Kronecker block of the Fisher for each factor with the large side left as identity.

Both are descent directions (a symmetric positive definite matrix on one side). Damping
(``damping_mode``): ``"absolute"`` uses l = damping; ``"trace"`` uses l = damping * tr(S) / r,
relative to the factor's mean eigenvalue, which stays meaningful when S_g is tiny (mean-reduced
losses, B near 0) where an absolute 1e-2 swamps it. ``preserve_grad_norm`` rescales each
preconditioned tensor to its norm before (the reference keeps the preconditioned magnitude,
units 1/S). Preconditioning is one batched ``cholesky_solve`` per group of same-shaped gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fteval.grit.stats import FactorGroup

__all__ = ["PAIRINGS", "DAMPING_MODES", "clip_gradients", "damped_cholesky", "plan_preconditioning", "precondition"]

PAIRINGS = ("grit", "kfac")
DAMPING_MODES = ("absolute", "trace")


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


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Clip the global norm of the gradients of every parameter ``optimizer`` updates to ``max_norm``."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def plan_preconditioning(
    groups: Sequence[FactorGroup], pairing: str, in_optimizer: set[int] | None
) -> tuple[list[tuple], int]:
    """Which gradients to precondition, batched by (group, side, shape, dtype): (jobs, layers touched).

    A job is (group, right-multiplied?, side, rows, row-index tensor, params): the lora_B
    weights are right-multiplied, the lora_A weights left-multiplied. A gradient is planned when
    it exists, its side has a cached factor, and (``in_optimizer``: the ids of the optimizer's
    parameters, or None for all) the optimizer updates it.
    """
    side_of_B, side_of_A = (0, 1) if pairing == "kfac" else (1, 0)  # 0 = S_a, 1 = S_g
    by_key: dict[tuple, tuple[list[int], list[torch.Tensor]]] = {}
    done_layers: set[tuple[int, int]] = set()
    for gi, group in enumerate(groups):
        for i, layer in enumerate(group.layers):
            pairs = ((layer.lora_B.weight, side_of_B, True), (layer.lora_A.weight, side_of_A, False))
            for param, side, right in pairs:
                if param.grad is None or not group.has_chol[i][side]:
                    continue
                if in_optimizer is not None and id(param) not in in_optimizer:
                    continue
                k = (gi, right, side, tuple(param.grad.shape), param.grad.dtype)
                rows, params = by_key.setdefault(k, ([], []))
                rows.append(i)
                params.append(param)
                done_layers.add((gi, i))
    jobs = [
        (groups[gi], right, side, rows, torch.tensor(rows, device=groups[gi].device), params)
        for (gi, right, side, _, _), (rows, params) in by_key.items()
    ]
    return jobs, len(done_layers)


def precondition(jobs: Sequence[tuple], preserve_grad_norm: bool) -> int:
    """Apply the cached inverses to the planned ``.grad`` tensors in place; returns how many were changed."""
    with torch.no_grad():
        for group, right, side, rows, index, params in jobs:
            grads = [p.grad for p in params]
            G = torch.stack(grads).float()  # B: [m, out, r] (right-multiplied), A: [m, r, in] (left)
            chol = group.chol[index, side]  # [m, r, r]
            if right:
                new = torch.cholesky_solve(G.transpose(1, 2), chol).transpose(1, 2)  # G M^-1 (M symmetric)
            else:
                new = torch.cholesky_solve(G, chol)  # M^-1 G
            if preserve_grad_norm:
                old_norm = torch.linalg.vector_norm(G, dim=(1, 2))
                new_norm = torch.linalg.vector_norm(new, dim=(1, 2))
                scale = torch.where(new_norm > 0, old_norm / new_norm, torch.ones_like(new_norm))
            else:
                scale = torch.tensor([group.inv_scale[i][side] for i in rows], dtype=G.dtype).to(group.device)
            new = new * scale[:, None, None]
            _copy_into(grads, list(new.to(grads[0].dtype).unbind(0)))
    return sum(len(job[3]) for job in jobs)


def _copy_into(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(targets, sources)  # one launch for many tensors
    else:  # pragma: no cover - older torch
        for t, s in zip(targets, sources):
            t.copy_(s)
