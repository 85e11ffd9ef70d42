"""GRITModule: LoRA with K-FAC natural-gradient preconditioning and Fisher-guided reprojection (GRIT, arXiv 2601.00231).

The module owns the model: a (4-bit or full-precision) base with fteval's own LoRA layers
(:class:`fteval.grit.GritLoraLinear`). GRIT's arithmetic is :mod:`fteval.grit` (the order of one
optimizer step is in its docstring; equations and defaults in docs/grit.md); the trainer's
callbacks run it, in any order (configs/grit.yaml):

* :class:`callbacks.kfac.KFACPreconditioner` (required) attaches the rank-space K-FAC statistics
  to the layers and, between backward and the optimizer step, adds the geometry penalties'
  gradients, clips and preconditions the adapter gradients;
* :class:`callbacks.regularisers.GeometryRegulariser` supplies those penalties;
* :class:`callbacks.reprojection.NeuralReprojection` projects the adapters onto the top
  eigenvectors of those statistics every N optimizer steps.

At the end of fit the adapter is exported as a standard PEFT LoRA folder, with the K-FAC factors,
their eigenbases and the effective rank per layer beside it, all read from the layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fteval.grit import export_grit_adapter, grit_layers, inject_grit_layers, kept_ranks, save_kfac_artifacts
from fteval.models.base import AdapterModule


class GRITModule(AdapterModule):
    """GRIT fine-tuning. Takes the arguments of :class:`fteval.models.base.AdapterModule`."""

    method_name = "grit"

    def attach_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        hp = self.hparams
        inject_grit_layers(model, list(hp.target_modules), r=hp.r, alpha=hp.alpha, dropout=hp.dropout,
                           use_rslora=hp.use_rslora)
        return model

    def on_fit_start(self) -> None:
        # Lightning runs the callbacks' on_fit_start first: by now the K-FAC callback has attached its statistics.
        if not any(layer.recorder is not None for layer in grit_layers(self.model).values()):
            names = [type(cb).__name__ for cb in self.trainer.callbacks]
            raise ValueError(
                "GRITModule needs callbacks.kfac.KFACPreconditioner in trainer.callbacks (configs/grit.yaml has it; "
                f"set its enabled: false for a plain-LoRA ablation); the trainer has {names}"
            )
        super().on_fit_start()

    def export_adapter(self, output_dir: Path) -> Path:
        """PEFT folder (adapter_config.json + adapter_model.safetensors) plus kfac_factors.safetensors and effective_rank.json."""
        hp = self.hparams
        out = export_grit_adapter(self.model, output_dir, base_model_name_or_path=hp.model_name_or_path,
                                  target_modules=list(hp.target_modules), r=hp.r, alpha=hp.alpha,
                                  dropout=hp.dropout, use_rslora=hp.use_rslora)
        layers = grit_layers(self.model)  # one set of paths for the factors and the reprojection's k
        save_kfac_artifacts(layers, out, effective_ranks=kept_ranks(layers) or None)
        return out
