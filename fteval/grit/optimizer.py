"""GRIT as one optimizer: a wrapper around any torch optimizer of the adapter parameters.

:class:`GRITOptimizer` owns the whole of one GRIT step, in the order the GRIT reference runs it
(docs/grit.md, "One step"):

1. the geometry penalties' gradients are added (:class:`~fteval.grit.regularisers.GeometryPenalties`);
2. the global gradient norm is clipped, before preconditioning;
3. the step's statistics are folded into the factors, due factors are refreshed and the adapter
   gradients preconditioned (:class:`~fteval.grit.kfac.KFAC`; with ``inverse_timing:
   previous_step`` the gradients are preconditioned first, with the factors of the previous
   refresh, as the reference does);
4. the inner optimizer steps;
5. when due, A and B are reprojected onto the factors' top eigenvectors
   (:class:`~fteval.grit.reprojection.Reprojection`).

It is usable from a plain torch loop::

    kfac = KFAC(); kfac.attach(model)
    opt = GRITOptimizer(torch.optim.AdamW(adapter_params, lr=2e-4), kfac,
                        penalties=GeometryPenalties(), reprojection=Reprojection(), model=model)
    for batch in loader:
        opt.begin_micro_batch(batch)          # which tokens' statistics count
        model(**batch).loss.backward()
        opt.step(); opt.zero_grad()

The wrapper shares the inner optimizer's ``param_groups`` and ``state`` (learning-rate schedulers
and checkpoints see one optimizer); the K-FAC and reprojection states are saved by their own
``state_dict`` (under Lightning, as callback state). Hand-written: torch and peft have no optimizer
that preconditions LoRA factors with statistics collected during the forward and backward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from fteval.grit.capture import token_mask_from_batch
from fteval.grit.kfac import KFAC
from fteval.grit.layer import grit_layers
from fteval.grit.regularisers import GeometryPenalties
from fteval.grit.reprojection import Reprojection

__all__ = ["GRITOptimizer"]


class GRITOptimizer(torch.optim.Optimizer):
    """GRIT's step around ``optimizer`` (module docstring).

    Args:
        optimizer: the inner optimizer over the adapter parameters (AdamW, SGD, ...).
        kfac: the statistics and preconditioner, attached to the model's GRIT layers.
        penalties: the geometry regulariser (None or weights 0: none), attached to the same model.
        reprojection: the Fisher-guided reprojection (None: none); needs ``model``.
        model: the module holding the GRIT layers (for the reprojection).

    After each :meth:`step`, ``metrics`` holds that step's diagnostics when ``collect_metrics``
    was True before it (``grit/preconditioned_layers``, ``grit/preconditioned_grads``,
    ``grit/factor_cond_max``, ``grit/kfac_ms``, the weighted penalties ``grit/reg_*``, and on a
    reprojection step ``grit/reprojected_layers`` and ``grit/effective_rank_mean``); otherwise
    an empty dict, or only the reprojection's entries on a reprojection step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kfac: KFAC,
        penalties: GeometryPenalties | None = None,
        reprojection: Reprojection | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        if isinstance(optimizer, GRITOptimizer):
            raise ValueError("GRITOptimizer wraps a plain torch optimizer, got another GRITOptimizer.")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GRITOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if not kfac.groups:
            raise ValueError("GRITOptimizer needs a KFAC attached to the model's GRIT layers: call kfac.attach(model) first.")
        if reprojection is not None and model is None:
            raise ValueError("GRITOptimizer(reprojection=...) needs model=, the module whose GRIT layers it projects.")
        # The base class sets up its hook dictionaries; then the inner optimizer's groups and state
        # replace the copies it made, so a scheduler or a checkpoint acting on either sees both.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.kfac = kfac
        self.penalties = penalties if penalties is not None and penalties.active else None
        self.reprojection = reprojection
        self.model = model
        self.collect_metrics = True
        self.check_finite = True
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_parts(cls, optimizer: torch.optim.Optimizer, parts: Iterable[Any], model: torch.nn.Module) -> GRITOptimizer:
        """GRIT's step around ``optimizer`` from the :class:`KFAC`, :class:`GeometryPenalties` and
        :class:`Reprojection` found among ``parts`` (e.g. a Trainer's callbacks, which subclass them),
        each attached to ``model``'s GRIT layers. A KFAC is required; at most one of each."""
        parts = list(parts)
        names = [type(p).__name__ for p in parts]

        def one(kind: type) -> Any:
            found = [p for p in parts if isinstance(p, kind)]
            if len(found) > 1:
                raise ValueError(f"GRIT takes one {kind.__name__}; got {len(found)} among {names}.")
            return found[0] if found else None

        kfac, penalties, reprojection = one(KFAC), one(GeometryPenalties), one(Reprojection)
        if kfac is None:
            raise ValueError(
                f"GRIT needs a KFAC (callbacks.kfac.KFACPreconditioner in trainer.callbacks; configs/grit.yaml has it, "
                f"enabled: false for a plain-LoRA ablation); got {names}."
            )
        if penalties is not None and penalties.reprojection_weight > 0.0 and reprojection is None:
            raise ValueError(
                "GeometryPenalties(reprojection_weight > 0) pulls towards the subspaces a Reprojection keeps "
                f"(callbacks.reprojection.NeuralReprojection), which is not among {names}; add it or set "
                "reprojection_weight: 0."
            )
        layers = set(map(id, grit_layers(model).values()))
        if not kfac.groups or id(kfac.groups[0].layers[0]) not in layers:
            kfac.attach(model)
        if penalties is not None and penalties.active:
            penalties.attach(model)
        if reprojection is not None:
            reprojection.attach(model)
        return cls(optimizer, kfac, penalties=penalties, reprojection=reprojection, model=model)

    # ------------------------------------------------------------------ per micro-batch
    def begin_micro_batch(self, batch: Any, loss_scale: float = 1.0, activation_dtype: torch.dtype = torch.float32) -> None:
        """Start recording a micro-batch's statistics: the tokens that count come from ``batch``
        (``labels`` / ``attention_mask``, per ``kfac.statistics_tokens``); ``loss_scale`` is the
        AMP scale its loss is multiplied by before backward."""
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None
        self.kfac.begin_micro_batch(token_mask_from_batch(batch, self.kfac.statistics_tokens), loss_scale,
                                    token_shape=shape, slot_dtype=activation_dtype)

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward) if given, then GRIT's step; returns the closure's value."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        metrics: dict[str, Any] = {}
        want = self.collect_metrics
        cuda = want and any(group.device.type == "cuda" for group in self.kfac.groups)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if self.penalties is not None:
            values = self.penalties.apply(self.kfac.step)
            if want:
                metrics.update(values)
        on_cpu = all(group.device.type == "cpu" for group in self.kfac.groups)
        metrics.update(self.kfac.optimizer_step_work(self.optimizer, check_finite=self.check_finite and (cuda or on_cpu),
                                                     metrics=want))
        if want:
            if cuda:
                torch.cuda.synchronize()
            metrics["grit/kfac_ms"] = 1000.0 * (time.perf_counter() - t0)
        self.optimizer.step()
        if self.reprojection is not None and self.reprojection.due(self.kfac.step):
            count = self.reprojection.reproject(self.model, [self.optimizer])
            ranks = list(self.reprojection.effective_ranks().values())
            metrics["grit/reprojected_layers"] = float(count)
            metrics["grit/effective_rank_mean"] = sum(ranks) / max(len(ranks), 1)
        self.metrics = metrics
        return loss

    # ------------------------------------------------------------------ the inner optimizer
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "optimizer" not in self.__dict__:  # the base class's __init__, before the groups are shared
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state (K-FAC and reprojection save their own)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state

    def __repr__(self) -> str:
        return f"GRITOptimizer({self.optimizer!r})"
