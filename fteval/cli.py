"""LightningCLI for the Trainer subcommands (fit, validate, test, predict).

Models are chosen by ``class_path`` in the config (QLoRAModule, GRITModule, AQIEvaluator); the data
module is always :class:`fteval.data.AlignmentDataModule`, and its tokenizer follows the model's
``model_name_or_path`` through an argument link. Optimisers are injected into the module as an
``OptimizerCallable`` (``auto_configure_optimizers=False``) so the module decides which parameters
are optimised: only the adapters, which exist only after ``configure_model``.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from fteval.data import AlignmentDataModule


class FTEvalCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=AlignmentDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.init_args.cache_dir", "data.cache_dir")
