"""LightningCLI for the Trainer subcommands (fit, validate, test).

Models are chosen by ``class_path`` in the config (QLoRAModule, GRITModule, AQIEvaluator); the data
module is always :class:`fteval.data.AlignmentDataModule`, and its tokenizer follows the model's
``model_name_or_path`` through an argument link. Optimisers are injected into the module as an
``OptimizerCallable`` (``auto_configure_optimizers=False``) so the module decides which parameters
are optimised: only the adapters, which exist only after ``configure_model``. Where the config
lists no progress bar, :func:`callbacks.progress.default_progress_bar` is added (Lightning's bar,
counting a ``max_steps`` run with gradient accumulation correctly).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI

from callbacks.progress import default_progress_bar

from fteval.data import AlignmentDataModule
from fteval.io import check_checkpoint_file


class FTEvalCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test; no module defines a predict step (answers come from ``fteval test``'s
        behaviour part and ``fteval bench generation``), so ``predict`` is not offered."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def __init__(self, args=None, run: bool = True):
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=AlignmentDataModule,
            subclass_mode_model=True,
            subclass_mode_data=False,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"default_env": False, "exit_on_error": False},  # parse errors: one line from __main__
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.model_name_or_path")
        parser.link_arguments("model.init_args.cache_dir", "data.cache_dir")

    def _parse_ckpt_path(self) -> None:
        """Validate a ``--ckpt_path`` file before LightningCLI reads its hyperparameters (and before anything is built)."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if isinstance(ckpt, (str, Path)) and str(ckpt) not in ("last", "best", "hpc", "registry"):
            check_checkpoint_file(Path(ckpt))
            self._check_checkpoint_method(sub, Path(ckpt))
        super()._parse_ckpt_path()

    def _check_checkpoint_method(self, sub: str, ckpt: Path) -> None:
        """A checkpoint of one method resumed with another method's config: say so (LightningCLI would
        silently switch the model class to the checkpoint's and keep the config's callbacks)."""
        import torch

        saved = torch.load(ckpt, weights_only=True, map_location="cpu").get("hyper_parameters", {}).get("_class_path")
        model = self.config[sub].get("model")
        wanted = getattr(model, "class_path", None)
        if saved and wanted and saved.rsplit(".", 1)[-1] != wanted.rsplit(".", 1)[-1]:
            raise ValueError(
                f"checkpoint {ckpt} was written by a {saved.rsplit('.', 1)[-1]} run, but this config trains "
                f"{wanted.rsplit('.', 1)[-1]}; resume with the config of the run that wrote it"
            )

    def before_instantiate_classes(self) -> None:
        """A resumed fit logs into the version folder its checkpoint came from, not a new one."""
        if self.subcommand != "fit":
            return
        cfg = self.config["fit"]
        ckpt, logger = cfg.get("ckpt_path"), cfg.trainer.get("logger")
        if not ckpt or not Path(ckpt).is_file() or not hasattr(logger, "class_path"):
            return
        run_dir = Path(ckpt).resolve().parent.parent  # <save_dir>/<name>/version_N/checkpoints/x.ckpt
        args = logger.init_args
        if (Path(ckpt).resolve().parent.name != "checkpoints" or not run_dir.name.startswith("version_")
                or args.get("version") is not None or "save_dir" not in args):
            return
        if run_dir.parent == (Path(args.save_dir) / (args.get("name") or "lightning_logs")).resolve():
            args.version = run_dir.name

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_log_dir()
            raise

    def _remove_empty_log_dir(self) -> None:
        """After a run that failed before any batch ran, remove the log folder it created.

        "Before any batch": no optimizer step and no training, validation or test batch started.
        Only a folder holding nothing but the saved config/hparams and TensorBoard event files
        (which then hold no measurement) is removed; empty parent folders go with it.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero or trainer.global_step > 0:
            return
        loops = (trainer.fit_loop.epoch_loop, trainer.validate_loop, trainer.test_loop, trainer.fit_loop.epoch_loop.val_loop)
        if any(loop.batch_progress.total.started > 0 for loop in loops):
            return
        try:
            log_dir = Path(trainer.log_dir) if trainer.log_dir else None
        except Exception:  # no logger / the folder could not be resolved
            return
        if log_dir is None or not log_dir.is_dir() or log_dir.resolve() == Path.cwd().resolve():
            return
        for entry in log_dir.iterdir():
            if not (entry.is_file() and (entry.name in ("config.yaml", "hparams.yaml")
                                         or entry.name.startswith("events.out.tfevents"))):
                return
        shutil.rmtree(log_dir, ignore_errors=True)
        for parent in (log_dir.parent, log_dir.parent.parent):  # <save_dir>/<name>, <save_dir>: only when empty
            try:
                parent.rmdir()
            except OSError:
                break

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> L.Trainer:
        listed = config.get("callbacks") or []
        listed = listed if isinstance(listed, list) else [listed]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in [*listed, *callbacks]
        ):
            callbacks = [*callbacks, default_progress_bar()]
        return super()._instantiate_trainer(config, callbacks)
