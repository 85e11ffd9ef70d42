"""GRITModule: LoRA with K-FAC natural-gradient preconditioning and Fisher-guided reprojection (GRIT, arXiv 2601.00231).

The module owns the model: a (4-bit or full-precision) base with fteval's own LoRA layers
(:class:`fteval.models.grit_layer.GritLoraLinear`). The GRIT work itself runs in callbacks, listed
in the trainer's callbacks in this order (configs/grit.yaml; equations and defaults in docs/grit.md):

* :class:`callbacks.regularisers.GeometryRegulariser` adds the gradients of the geometry penalties;
* :class:`callbacks.kfac.KFACPreconditioner` (required) collects rank-space K-FAC statistics,
  clips and preconditions the adapter gradients in ``on_before_optimizer_step`` (after AMP
  unscaling, before the optimizer step);
* :class:`callbacks.reprojection.NeuralReprojection` projects the adapters onto the top
  eigenvectors of those statistics every N optimizer steps.

At the end of fit the adapter is exported as a standard PEFT LoRA folder, with the K-FAC factors,
their eigenbases and the effective rank per layer beside it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fteval.models.base import AdapterModule
from fteval.models.grit_layer import export_grit_adapter, grit_layers, inject_grit_layers, save_kfac_artifacts


class GRITModule(AdapterModule):
    """GRIT fine-tuning. Takes the arguments of :class:`fteval.models.base.AdapterModule`."""

    method_name = "grit"

    def attach_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        hp = self.hparams
        inject_grit_layers(model, list(hp.target_modules), r=hp.r, alpha=hp.alpha, dropout=hp.dropout,
                           use_rslora=hp.use_rslora)
        return model

    def on_fit_start(self) -> None:
        from callbacks.kfac import KFACPreconditioner  # callbacks import fteval.models: import here, not at the top

        names = [type(cb).__name__ for cb in self.trainer.callbacks]
        if not any(isinstance(cb, KFACPreconditioner) for cb in self.trainer.callbacks):
            raise ValueError(
                "GRITModule needs callbacks.kfac.KFACPreconditioner in trainer.callbacks (configs/grit.yaml has it; "
                f"set its enabled: false for a plain-LoRA ablation); the trainer has {names}"
            )

    def _reprojection(self):
        from callbacks.reprojection import NeuralReprojection

        return next((cb for cb in self.trainer.callbacks if isinstance(cb, NeuralReprojection)), None)

    def export_adapter(self, output_dir: Path) -> Path:
        """PEFT folder (adapter_config.json + adapter_model.safetensors) plus kfac_factors.safetensors and effective_rank.json."""
        hp = self.hparams
        out = export_grit_adapter(self.model, output_dir, base_model_name_or_path=hp.model_name_or_path,
                                  target_modules=list(hp.target_modules), r=hp.r, alpha=hp.alpha,
                                  dropout=hp.dropout, use_rslora=hp.use_rslora)
        reproj = self._reprojection() if self._trainer is not None else None
        ranks = reproj.effective_ranks() if reproj is not None else None
        save_kfac_artifacts(grit_layers(self.model), out, effective_ranks=ranks or None)
        return out
