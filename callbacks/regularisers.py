"""GRIT's geometry regularisers in a Trainer: their settings and nothing else.

The penalties and their gradients are :class:`fteval.grit.GeometryPenalties` (equations and
defaults there and in docs/grit.md). They act inside :class:`fteval.grit.GRITOptimizer`'s step,
before clipping and preconditioning; ``GRITModule.configure_optimizers`` hands this callback to
the optimizer, and :class:`~callbacks.kfac.KFACPreconditioner` logs the weighted penalties
(``grit/reg_curvature``, ``grit/reg_reprojection``; not part of the logged ``train/loss``).
"""

from __future__ import annotations

import lightning as L

from callbacks.kfac import grit_optimizer
from fteval.grit import GeometryPenalties

__all__ = ["GeometryRegulariser"]


class GeometryRegulariser(GeometryPenalties, L.Callback):
    """:class:`fteval.grit.GeometryPenalties` in a Trainer: the same arguments.

    Used by ``GRITModule``, which needs ``KFACPreconditioner`` among the callbacks (the
    statistics the penalties read) and, for ``reprojection_weight > 0``, ``NeuralReprojection``
    (the subspaces they pull towards).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = grit_optimizer(trainer)
        if self.active and (optimizer is None or optimizer.penalties is not self):
            names = [type(cb).__name__ for cb in trainer.callbacks]
            raise ValueError(
                "GeometryRegulariser acts inside GRIT's optimizer step, which needs callbacks.kfac.KFACPreconditioner "
                f"among the callbacks (it keeps the statistics the penalties read); the trainer has {names}."
            )
