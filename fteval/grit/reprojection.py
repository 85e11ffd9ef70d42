"""Fisher-guided reprojection of GRIT's LoRA factors onto their dominant rank-space directions.

Every ``every_n_steps`` optimizer steps, after the optimizer step, per GRIT layer (docs/grit.md,
"Equations"): eigendecompose the rank-space factors in fp32 (``torch.linalg.eigh``), keep the
top-k eigenvectors V_a of S_a (and V_g of S_g; V_a stands in while S_g has fewer than
``min_samples`` tokens or a zero trace, e.g. B = 0), and project

    A <- V_a V_a^T A        (rows of A ``[r, in]`` into span(V_a))
    B <- B V_g V_g^T        (columns of B ``[out, r]``; V_a in place of V_g when not two_sided, as the reference)

Defaults are GRIT's (docs/grit.md): the spec's top-k 4 every 40 steps, two-sided as the
reference. ``project_moments=True`` (an fteval variant; the reference leaves the optimizer
state alone) applies the same linear maps to the optimizer's first moment (Adam
``exp_avg``, SGD ``momentum_buffer``) of those parameters, so momentum does not push the
removed directions straight back. Adam's second moment ``exp_avg_sq`` is left alone either
way: it is a per-coordinate mean of squared gradients, and a rotation-and-truncation in
rank space does not map it to the second moment of the projected gradient (that would need
the full covariance, which Adam does not keep).

Dynamic rank (``dynamic_rank=True``, the reference's rank adaptation; its defaults are the
reference's 99% energy and floor 4): k = smallest count of S_a's eigenvalues holding
``energy_threshold`` of its trace, clamped to [min(min_rank, r), r]; otherwise
k = min(top_k, r). The same k is used for both sides, so B A has rank <= k.

What a reprojection keeps is stored on each layer (``layer.subspace``, a :class:`KeptSubspace`),
where the geometry regulariser and the adapter export read it; the statistics come from
``layer.stats`` (:mod:`fteval.grit.stats`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fteval.grit.layer import GritLoraLinear, LayerState, grit_layers

__all__ = ["KeptSubspace", "Reprojection", "energy_rank", "kept_ranks"]

_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")


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


class KeptSubspace:
    """What the reprojection keeps of one layer: rank ``rank`` (r until the first projection) and
    ``basis`` (None until then): ``V_a``, ``V_g`` ``[r, k]`` orthonormal columns and ``eigvals_a``
    (and ``eigvals_g`` where S_g was used) ``[r]`` descending, on the CPU."""

    __slots__ = ("rank", "basis")

    def __init__(self, rank: int, basis: dict[str, torch.Tensor] | None = None) -> None:
        self.rank = int(rank)
        self.basis = basis


def kept_ranks(layers: Mapping[str, GritLoraLinear]) -> dict[str, int]:
    """Current k per layer path, for layers a reprojection is attached to (none: empty)."""
    return {name: layer.subspace.rank for name, layer in layers.items() if layer.subspace is not None}


class Reprojection(LayerState):
    """Project every GRIT layer's A (and B) onto the top-k eigenvectors of its K-FAC factors.

    Args:
        every_n_steps: optimizer steps between reprojections (:meth:`due`).
        top_k: rank kept when ``dynamic_rank`` is False (clamped to r).
        two_sided: project B with S_g's eigenvectors (False: with S_a's, as the reference's one-sided mode).
        dynamic_rank: choose k per layer by cumulative eigenvalue energy of S_a (reference option).
        energy_threshold: fraction of tr(S_a) the kept eigenvalues must hold (dynamic rank; reference 0.99).
        min_rank: lower clamp of the dynamic rank (reference 4; clamped to r).
        min_samples: real tokens a factor needs before its eigenvectors are trusted.
        project_moments: also project the optimizer's first moment of A and B (fteval variant).

    Under DDP the projections are computed from identical (all-reduced) factors and also
    broadcast from rank 0, so replicas cannot drift apart.
    """

    def __init__(
        self,
        every_n_steps: int = 40,
        top_k: int = 4,
        two_sided: bool = True,
        dynamic_rank: bool = False,
        energy_threshold: float = 0.99,
        min_rank: int = 4,
        min_samples: int = 128,
        project_moments: bool = False,
    ) -> None:
        super().__init__()
        counts = {"every_n_steps": every_n_steps, "top_k": top_k, "min_rank": min_rank, "min_samples": min_samples}
        for label, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}.")
        if not 0.0 < energy_threshold <= 1.0:
            raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold!r}.")
        self.every_n_steps = every_n_steps
        self.top_k = top_k
        self.two_sided = bool(two_sided)
        self.dynamic_rank = bool(dynamic_rank)
        self.energy_threshold = float(energy_threshold)
        self.min_rank = min_rank
        self.min_samples = min_samples
        self.project_moments = bool(project_moments)

        self.period = 0  # optimizer steps // every_n_steps at the last reprojection
        self._layers: dict[str, GritLoraLinear] = {}

    def attach(self, model: torch.nn.Module) -> dict[str, GritLoraLinear]:
        """The GRIT layers of ``model``, each given a :class:`KeptSubspace` (full rank until projected;
        a layer's earlier one carries over) and a loaded state restored onto them."""
        layers = grit_layers(model)
        for layer in layers.values():
            if layer.subspace is None:
                layer.subspace = KeptSubspace(layer.r)
        self._layers = layers
        self._restore_pending()
        return layers

    def due(self, optimizer_steps: int) -> bool:
        """Whether a reprojection is due after ``optimizer_steps`` optimizer steps: once each time
        ``optimizer_steps // every_n_steps`` grows (gradient-accumulation safe); records it."""
        period = optimizer_steps // self.every_n_steps
        if period <= self.period:
            return False
        self.period = period
        return True

    # ------------------------------------------------------------------ the work
    def _ranks_for(self, eigvals_desc: torch.Tensor, r: int) -> list[int]:
        """k per layer from eigenvalues ``[layers, r]`` (descending)."""
        if self.dynamic_rank:
            return [energy_rank(ev, self.energy_threshold, min(self.min_rank, r), r) for ev in eigvals_desc]
        return [min(self.top_k, r)] * eigvals_desc.shape[0]

    def _plan(self, layers: list[GritLoraLinear]) -> tuple[torch.Tensor, torch.Tensor, list[int], list[dict]]:
        """Projections for layers of one rank, fp32 on the CPU: P_a, P_g ``[layers, r, r]``, k, bases.

        One batched ``torch.linalg.eigh`` per side (r x r matrices are cheaper on the CPU
        than as hundreds of tiny GPU launches).
        """
        r = layers[0].r
        S_a = torch.stack([layer.stats.S_a.detach().float().cpu() for layer in layers])  # [n, r, r]
        ev_a, V_a = torch.linalg.eigh(S_a)  # ascending
        ev_a, V_a = ev_a.flip(-1), V_a.flip(-1)  # descending
        ks = self._ranks_for(ev_a, r)
        keep = (torch.arange(r)[None, :] < torch.tensor(ks)[:, None]).float()  # [n, r] first k columns
        P_a = (V_a * keep[:, None, :]) @ V_a.transpose(1, 2)
        P_g, V_g, ev_g = P_a.clone(), V_a, [None] * len(layers)
        if self.two_sided:
            S_g = torch.stack([layer.stats.S_g.detach().float().cpu() for layer in layers])
            usable = [
                layer.stats.n_g >= self.min_samples and float(torch.trace(S)) > 0.0 for layer, S in zip(layers, S_g)
            ]
            if any(usable):
                e, V = torch.linalg.eigh(S_g)
                e, V = e.flip(-1), V.flip(-1)
                P = (V * keep[:, None, :]) @ V.transpose(1, 2)
                use = torch.tensor(usable)
                P_g = torch.where(use[:, None, None], P, P_a)
                V_g = torch.where(use[:, None, None], V, V_a)
                ev_g = [e[j] if usable[j] else None for j in range(len(layers))]
        bases = []
        for j, k in enumerate(ks):
            b = {"V_a": V_a[j, :, :k].clone(), "eigvals_a": ev_a[j].clone(), "V_g": V_g[j, :, :k].clone()}
            if ev_g[j] is not None:
                b["eigvals_g"] = ev_g[j].clone()
            bases.append(b)
        return P_a, P_g, ks, bases

    @torch.no_grad()
    def reproject(self, model: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
        """Project every ready GRIT layer of ``model`` (and its optimizer first moments); returns the count."""
        layers = self.attach(model)
        ready: dict[tuple[torch.device, int], list[str]] = {}
        for name, layer in layers.items():
            st = layer.stats
            if st is not None and st.n_a >= self.min_samples and float(torch.trace(st.S_a)) > 0.0:
                ready.setdefault((layer.lora_A.weight.device, layer.r), []).append(name)
        states = [opt.state for opt in optimizers] if self.project_moments else []
        distributed = (
            torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1
        )
        count = 0
        for (device, _), names in ready.items():
            P_a, P_g, ks, bases = self._plan([layers[n] for n in names])
            P_a, P_g = P_a.to(device), P_g.to(device)
            if distributed:  # identical factors give identical projections; broadcast so replicas cannot drift
                torch.distributed.broadcast(P_a, src=0)
                torch.distributed.broadcast(P_g, src=0)
            for j, name in enumerate(names):
                layer = layers[name]
                A, B = layer.lora_A.weight, layer.lora_B.weight
                A.copy_((P_a[j] @ A.float()).to(A.dtype))  # [r, r] @ [r, in]
                self._project_moments(states, A, lambda m, P=P_a[j]: P @ m)
                B.copy_((B.float() @ P_g[j]).to(B.dtype))  # [out, r] @ [r, r]; P_g = P_a when one-sided
                self._project_moments(states, B, lambda m, P=P_g[j]: m @ P)
                layer.subspace = KeptSubspace(ks[j], bases[j])
                count += 1
        return count

    @staticmethod
    def _project_moments(states: list[Mapping[Any, dict[str, Any]]], param: torch.Tensor, project) -> None:
        for state in states:
            entry = state.get(param)
            if not entry:
                continue
            for key in _FIRST_MOMENTS:
                m = entry.get(key)
                if isinstance(m, torch.Tensor) and m.shape == param.shape:
                    m.copy_(project(m.float()).to(m.dtype))

    def subspaces(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per reprojected layer path: (V_a, V_g), the ``[r, k]`` orthonormal bases of the latest projection (CPU)."""
        return {
            name: (layer.subspace.basis["V_a"], layer.subspace.basis["V_g"])
            for name, layer in self._layers.items()
            if layer.subspace is not None and layer.subspace.basis is not None
        }

    def effective_ranks(self) -> dict[str, int]:
        """Current k per GRIT layer path (r for layers not reprojected yet)."""
        return kept_ranks(self._layers)

    # ------------------------------------------------------------------ state
    def _state(self) -> dict[str, Any]:
        return {
            "version": 1,
            "period": self.period,
            "ranks": self.effective_ranks(),
            "bases": {name: dict(layer.subspace.basis) for name, layer in self._layers.items()
                      if layer.subspace is not None and layer.subspace.basis is not None},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """The period now; the layers' subspaces now if attached, else at :meth:`attach`."""
        self.period = int(state_dict["period"])
        super().load_state_dict(state_dict)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        bases = state["bases"]
        for name, rank in state["ranks"].items():
            layer = self._layers.get(str(name))
            if layer is not None:
                basis = bases.get(name)
                layer.subspace = KeptSubspace(int(rank), None if basis is None else dict(basis))
