"""GRITModule: LoRA with K-FAC natural-gradient preconditioning and Fisher-guided reprojection (GRIT, arXiv 2601.00231).

The module owns the model: a (4-bit or full-precision) base with fteval's own LoRA layers
(:class:`fteval.grit.GritLoraLinear`). GRIT's step is :class:`fteval.grit.GRITOptimizer` (the order
of one optimizer step is in :mod:`fteval.grit`; equations and defaults in docs/grit.md), built in
:meth:`GRITModule.wrap_optimizer` around the configured optimizer from the trainer's callbacks,
which hold GRIT's settings and state, in any order (configs/grit.yaml):

* :class:`callbacks.kfac.KFACPreconditioner` (required): the rank-space K-FAC statistics and
  preconditioner; it also starts each micro-batch's statistics and logs the step's metrics;
* :class:`callbacks.regularisers.GeometryRegulariser`: the geometry penalties;
* :class:`callbacks.reprojection.NeuralReprojection`: the reprojection every N optimizer steps.

At the end of fit the adapter is exported as a standard PEFT LoRA folder, with the K-FAC factors,
their eigenbases and the effective rank per layer beside it, all read from the layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fteval.grit import (
    GRITOptimizer,
    export_grit_adapter,
    grit_layers,
    inject_grit_layers,
    kept_ranks,
    save_kfac_artifacts,
)
from fteval.methods import GRIT
from fteval.models.base import AdapterModule


class GRITModule(AdapterModule):
    """GRIT fine-tuning. Takes the arguments of :class:`fteval.models.base.AdapterModule`."""

    method_name = GRIT.name

    def attach_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        hp = self.hparams
        inject_grit_layers(model, list(hp.target_modules), r=hp.r, alpha=hp.alpha, dropout=hp.dropout,
                           use_rslora=hp.use_rslora)
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> GRITOptimizer:
        """:class:`fteval.grit.GRITOptimizer` around ``optimizer``, with the trainer's K-FAC, regulariser
        and reprojection callbacks attached to this model's GRIT layers."""
        callbacks = list(self.trainer.callbacks) if self._trainer is not None else []
        return GRITOptimizer.from_parts(optimizer, callbacks, self.model)

    def export_adapter(self, output_dir: Path) -> Path:
        """PEFT folder (adapter_config.json + adapter_model.safetensors) plus kfac_factors.safetensors and effective_rank.json."""
        hp = self.hparams
        out = export_grit_adapter(self.model, output_dir, base_model_name_or_path=hp.model_name_or_path,
                                  target_modules=list(hp.target_modules), r=hp.r, alpha=hp.alpha,
                                  dropout=hp.dropout, use_rslora=hp.use_rslora)
        layers = grit_layers(self.model)  # one set of paths for the factors and the reprojection's k
        save_kfac_artifacts(layers, out, effective_ranks=kept_ranks(layers) or None)
        return out
