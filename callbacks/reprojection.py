"""Fisher-guided neural reprojection of GRIT's LoRA factors, as a Lightning callback.

The projection is :class:`fteval.grit.Reprojection` (equations and defaults there and in
docs/grit.md). It acts after the optimizer step, in ``on_train_batch_end`` once
``trainer.global_step // every_n_steps`` has grown (gradient-accumulation safe), on the
statistics that :class:`~callbacks.kfac.KFACPreconditioner` folds before the step; it reads
them from the layers, never from that callback, but needs it in the trainer.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from fteval.grit import Reprojection

__all__ = ["NeuralReprojection"]


class NeuralReprojection(Reprojection, L.Callback):
    """:class:`fteval.grit.Reprojection` in a Trainer: the same arguments.

    Logged when a reprojection step is reached: ``grit/reprojected_layers`` (layers
    actually projected) and ``grit/effective_rank_mean`` (mean current k over all layers).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = self.attach(pl_module)
        if not layers:
            raise ValueError(
                "NeuralReprojection found no GritLoraLinear in the model: inject GRIT layers with "
                "fteval.grit.inject_grit_layers (GRITModule does so in configure_model)."
            )
        if all(layer.stats is None for layer in layers.values()):
            raise ValueError(
                "NeuralReprojection needs the rank-space statistics that callbacks.kfac.KFACPreconditioner collects: "
                "add it to the Trainer callbacks (enabled=False collects statistics without preconditioning)."
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.due(trainer.global_step):
            return
        count = self.reproject(pl_module, trainer.optimizers)
        ranks = list(self.effective_ranks().values())
        pl_module.log("grit/reprojected_layers", float(count), on_step=True, on_epoch=False)
        pl_module.log("grit/effective_rank_mean", sum(ranks) / max(len(ranks), 1), on_step=True, on_epoch=False)
