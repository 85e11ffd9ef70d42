"""GRIT's geometry regularisers as a Lightning callback.

The penalties and their gradients are :class:`fteval.grit.GeometryPenalties` (equations and
defaults there and in docs/grit.md). Their gradients must be added before K-FAC clips and
preconditions, so this callback does not act on its own: at fit start it registers with the
:class:`~callbacks.kfac.KFACPreconditioner` among the trainer's callbacks, whose
``on_before_optimizer_step`` adds them first, wherever either callback stands in the list. The
penalties are not part of the logged ``train/loss``; they are logged as ``grit/reg_curvature``
and ``grit/reg_reprojection`` (weighted values) on Lightning's logging steps.
"""

from __future__ import annotations

import lightning as L

from callbacks.kfac import KFACPreconditioner
from callbacks.reprojection import NeuralReprojection
from fteval.grit import GeometryPenalties

__all__ = ["GeometryRegulariser"]


class GeometryRegulariser(GeometryPenalties, L.Callback):
    """:class:`fteval.grit.GeometryPenalties` in a Trainer: the same arguments.

    Needs ``KFACPreconditioner`` among the callbacks (it applies the gradients, and keeps the
    statistics the curvature penalty reads); ``reprojection_weight > 0`` also needs
    ``NeuralReprojection`` (the subspaces it pulls towards).
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active:
            return
        self.attach(pl_module)
        names = [type(cb).__name__ for cb in trainer.callbacks]
        kfac = next((cb for cb in trainer.callbacks if isinstance(cb, KFACPreconditioner)), None)
        if kfac is None:
            raise ValueError(
                "GeometryRegulariser needs callbacks.kfac.KFACPreconditioner, which adds its gradients before "
                f"clipping and preconditioning and keeps the statistics it reads; the trainer has {names}."
            )
        if self.reprojection_weight > 0.0 and not any(isinstance(cb, NeuralReprojection) for cb in trainer.callbacks):
            raise ValueError(
                "GeometryRegulariser(reprojection_weight > 0) pulls towards the subspaces of "
                f"callbacks.reprojection.NeuralReprojection, which is not among the callbacks {names}."
            )
        kfac.add_penalties(self)
