"""LightningCLI for the Trainer subcommands (fit, validate, test).

Models are chosen by ``class_path`` in the config (a method's module from fteval.methods, or AQIEvaluator); the data
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
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks.progress import default_progress_bar

from fteval.data import AlignmentDataModule
from fteval.db.values import redact_secrets
from fteval.io import check_checkpoint_file, write_text_atomic
from fteval.preflight import FolderLock, adapter_bytes_estimate, check_output_folders, claim_version_dir


def _redacted_yaml(text: str) -> str:
    """A YAML config with every credential (``api_key``, ``token``, ...) replaced by ``<redacted>``."""
    import yaml

    return yaml.safe_dump(redact_secrets(yaml.safe_load(text)), sort_keys=False, allow_unicode=True)


class RedactedConfigCallback(SaveConfigCallback):
    """Lightning's ``config.yaml`` in the run's log folder, with credentials redacted (written atomically).

    A judge's key is best given by environment variable (``OPENAI_API_KEY``); one written in the
    config still never reaches a file.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective call: every rank makes it
        if trainer.is_global_zero and self.save_to_log_dir and log_dir is not None:
            text = self.parser.dump(self.config, skip_none=False)
            write_text_atomic(Path(log_dir) / self.config_filename, _redacted_yaml(text))
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)


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
            save_config_callback=RedactedConfigCallback,
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
        locks: list[FolderLock] = []
        try:
            self._preflight(subcommand, locks)
            super()._run_subcommand(subcommand)
        except BaseException:
            self._remove_empty_log_dir()
            raise
        finally:
            for lock in locks:
                lock.release()

    def _output_folders(self) -> list[tuple[Path, str, bool]]:
        """``(folder, setting, lock it)`` for every folder this run writes into."""
        from callbacks.run_logger import ExperimentDBLogger

        trainer, hp = self.trainer, getattr(self.model, "hparams", {})
        folders: list[tuple[Path, str, bool]] = []
        if hp.get("export_dir"):
            folders.append((Path(hp["export_dir"]), "--model.init_args.export_dir", True))
        if self.subcommand == "test" and hp.get("results_dir"):
            folders.append((Path(hp["results_dir"]), "--model.init_args.results_dir", True))
        if self.datamodule is not None:
            folders.append((Path(self.datamodule.hparams.output_dir), "--data.output_dir", False))
        for logger in trainer.loggers:
            root = getattr(logger, "root_dir", None) or getattr(logger, "save_dir", None)
            if root:
                folders.append((Path(root), "the logger's save_dir (--trainer.logger.init_args.save_dir)", False))
        if not trainer.loggers:
            folders.append((Path(trainer.default_root_dir), "--trainer.default_root_dir", False))
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                folders.append((Path(cb.dirpath), "the ModelCheckpoint dirpath", False))
        for cb in trainer.callbacks:
            if isinstance(cb, ExperimentDBLogger):
                folders.append((cb.db_path.parent, "the ExperimentDBLogger db_path", False))
        return folders

    def _bytes_needed(self) -> int:
        """What the run writes beyond logs, from the model's ``config.json`` (no weights are read).

        fit: the exported adapter and one checkpoint holding the adapter and Adam's two moments, 4 x the
        fp32 adapter. test: ``embeddings.safetensors``, fp32 ``[prompts, layers + 1, hidden]`` plus the
        pooled ``[prompts, hidden]`` per model (baseline and each adapter). 0 when the config cannot be
        read without loading the model (a hub id not in the local cache) or the run writes neither.
        """
        hp = getattr(self.model, "hparams", {})
        fit = self.subcommand == "fit" and "r" in hp and "target_modules" in hp
        test = self.subcommand == "test" and hp.get("save_embeddings") and self.datamodule is not None
        if not (fit or test):
            return 0
        from transformers import AutoConfig

        from fteval.models.loading import resolve_model_path

        source = resolve_model_path(hp["model_name_or_path"], Path(hp["cache_dir"]) if hp.get("cache_dir") else None)
        try:
            config = AutoConfig.from_pretrained(source, local_files_only=True)
            if fit:
                return 4 * adapter_bytes_estimate(config, hp["r"], hp["target_modules"])
            prompts = 2 * int(self.datamodule.hparams.n_per_class)
            models = 1 + len(hp.get("adapters") or {})
            return 4 * prompts * (int(config.num_hidden_layers) + 2) * int(config.hidden_size) * models
        except (OSError, ValueError, AttributeError, TypeError):
            return 0

    def _preflight(self, subcommand: str, locks: list[FolderLock]) -> None:
        """Before any model loads: every output folder writable with room to spare, the results/export folder
        locked for this run, a version folder of its own claimed, and the run's own config handed to the
        experiment-database logger (so its row never reads another run's ``config.yaml``)."""
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        from callbacks.run_logger import ExperimentDBLogger

        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        folders = self._output_folders()
        check_output_folders([(f, option) for f, option, _ in folders], self._bytes_needed())
        for folder, option, lock in folders:
            if lock:
                locks.append(FolderLock(folder, option).acquire())
        for logger in trainer.loggers:
            # A version chosen by the logger itself (the next free number) is only read when first used,
            # so two runs started together would pick the same one; claim it here instead.
            if isinstance(logger, (TensorBoardLogger, CSVLogger)) and logger._version is None:
                logger._version = claim_version_dir(Path(logger.root_dir))
        run_config = self._parser(subcommand).dump(self.config[subcommand], skip_none=False)
        import yaml

        for cb in trainer.callbacks:
            if isinstance(cb, ExperimentDBLogger):
                cb.run_config = yaml.safe_load(run_config)

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
