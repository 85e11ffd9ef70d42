"""Fisher-guided neural reprojection of GRIT's LoRA factors in a Trainer: its settings and state.

The projection is :class:`fteval.grit.Reprojection` (equations and defaults there and in
docs/grit.md). It runs inside :class:`fteval.grit.GRITOptimizer`'s step, right after the inner
optimizer's update, once the optimizer-step count reaches the next multiple of ``every_n_steps``
(gradient-accumulation safe), on the statistics folded in that step. ``GRITModule`` hands this
callback to the optimizer; its state (the period and the kept subspaces) is saved in checkpoints
as callback state, and :class:`~callbacks.kfac.KFACPreconditioner` logs ``grit/reprojected_layers``
and ``grit/effective_rank_mean`` on reprojection steps.
"""

from __future__ import annotations

import lightning as L

from callbacks.kfac import grit_optimizer
from fteval.grit import Reprojection

__all__ = ["NeuralReprojection"]


class NeuralReprojection(Reprojection, L.Callback):
    """:class:`fteval.grit.Reprojection` in a Trainer: the same arguments (needs ``KFACPreconditioner``,
    whose statistics it projects onto)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = grit_optimizer(trainer)
        if optimizer is None or optimizer.reprojection is not self:
            names = [type(cb).__name__ for cb in trainer.callbacks]
            raise ValueError(
                "NeuralReprojection runs inside GRIT's optimizer step and projects onto the rank-space statistics "
                "that callbacks.kfac.KFACPreconditioner collects: add it to the Trainer callbacks (enabled=False "
                f"collects statistics without preconditioning); the trainer has {names}."
            )
