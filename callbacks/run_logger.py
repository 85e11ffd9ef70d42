"""`ExperimentDBLogger`: a Lightning callback that records every fit/test run in the experiment database.

What it writes (rank zero only; other ranks never open the database):

* an ``experiments`` row when training starts (``on_train_start``, which runs after a
  checkpoint's callback state is restored under every strategy) or when testing starts:
  method, stage, resolved config, git commit, seed, package versions, hardware;
* per optimizer step, buffered and flushed in one transaction every ``log_every_n_steps``
  steps and at the end: ``loss`` and the other scalars the ``training_step`` returned,
  the step-level training scalars in ``trainer.callback_metrics`` (names not starting
  with ``val``/``test``/``predict`` and not ending in ``_epoch``; like Lightning's own
  loggers, a metric logged every k steps keeps its last value in between), ``lr`` (the
  rate the step used; one per param group: ``lr/pg<i>``), ``epoch``, ``time/step_s`` (wall seconds of the step's
  batches) and, on CUDA, ``memory/peak_alloc_gib``. Under gradient accumulation the
  ``training_step`` outputs are averaged over the step's micro-batches, and the
  ``callback_metrics`` are read once, at the micro-batch the optimizer stepped on: the
  values Lightning's loggers (TensorBoard) write for that step. Read at every micro-batch,
  a metric logged around the optimizer step (``train/grad_norm``) would mix in the previous
  step's value;
* validation scalars (names starting with ``val``) at each validation end, at the current
  global step, and ``time/fit_s`` at the end of training;
* artifacts at the end of fit: the ModelCheckpoint files (best and last) and every path in
  ``pl_module.artifact_paths`` (``{kind: path}``), each with size and sha256;
* the final status: ``finished``, ``failed`` or ``interrupted`` (with the error message); a run
  whose process dies is marked ``crashed`` by the next run that opens the database.

Coupling with the LightningModule (all optional, duck-typed):
``pl_module.method_name`` (str) names the method (else the class name): the experiment's
``method``, under which its per-step metrics go to ``training_metrics`` (any method, registered
in :mod:`fteval.methods` or not); ``pl_module.experiment_id`` is set to the row id on every
rank when the attribute exists, and ``pl_module.experiment_db_path`` to this database, so the
module (and :class:`callbacks.alignment.AlignmentMonitor`) can attach rows with
``ExperimentDB(pl_module.experiment_db_path).add_aqi_scores(pl_module.experiment_id, ...)``;
``pl_module.artifact_paths`` is read at fit end. The experiment id is also in
:attr:`ExperimentDBLogger.experiment_id` and in the callback's checkpoint state, so a
resumed fit continues the same experiment (its rows after the resume step are replaced).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from fteval.db import ExperimentDB
from fteval.envinfo import collect_manifest, git_commit

__all__ = ["ExperimentDBLogger"]

_EVAL_PREFIXES = ("val", "test", "predict", "align/")  # align/: written by callbacks.alignment at its own steps


def _scalar(value: Any) -> Optional[float]:
    """A Python float from a number or a one-element tensor; None for anything else."""
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class ExperimentDBLogger(L.Callback):
    """Record fit/test runs, per-step metrics, artifacts and status in the experiment database.

    Args:
        db_path: the SQLite experiment database (created/migrated on first use).
        experiment_name: label of the experiment row; default ``<method>-<stage>-<UTC time>``.
        log_every_n_steps: flush buffered metrics every this many optimizer steps
            (every step is recorded; this only sets how often a transaction commits).
    """

    def __init__(
        self,
        db_path: Union[str, Path] = "output/centralized.db",
        experiment_name: Optional[str] = None,
        log_every_n_steps: int = 1,
    ) -> None:
        if int(log_every_n_steps) < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}.")
        self.db_path = Path(db_path)
        self.experiment_name = experiment_name
        self.log_every_n_steps = int(log_every_n_steps)
        self.experiment_id: Optional[int] = None
        self._restored_id: Optional[int] = None
        self._db: Optional[ExperimentDB] = None
        self._pending: dict[int, dict[str, list[float]]] = {}  # step -> name -> [sum, count]
        self._ready: list[tuple[int, str, float]] = []  # complete (step, name, value) rows not yet written
        self._step: Optional[int] = None  # optimizer step the current batch contributes to
        self._t_batch = 0.0
        self._t_fit = 0.0
        self._lrs: dict[str, float] = {}
        # The resolved command-line config of this run, handed over by fteval's CLI before the run starts
        # (else read from the log folder's config.yaml).
        self.run_config: Optional[dict[str, Any]] = None

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "db_path": str(self.db_path)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("db_path") not in (None, str(self.db_path)):
            rank_zero_warn(f"The checkpoint's experiment is in {state_dict['db_path']}, not {self.db_path}; "
                           "this run is recorded as a new experiment.")
            return
        self._restored_id = state_dict.get("experiment_id")

    # -- helpers -----------------------------------------------------------------------------
    def _open(self) -> ExperimentDB:
        if self._db is None:
            self._db = ExperimentDB(self.db_path)
        return self._db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @staticmethod
    def _method(pl_module: L.LightningModule) -> str:
        return str(getattr(pl_module, "method_name", None) or type(pl_module).__name__)

    def _config(self, trainer: L.Trainer, pl_module: L.LightningModule, log_dir: Optional[str]) -> dict[str, Any]:
        """hparams, the run's LightningCLI config (:attr:`run_config`, else the one saved in the log dir), and
        the trainer's runtime settings."""
        config: dict[str, Any] = {"hparams": dict(pl_module.hparams)}
        cli_file = Path(log_dir) / "config.yaml" if log_dir else None
        if self.run_config is not None:
            config["cli"] = self.run_config
        elif cli_file is not None and cli_file.is_file():
            import yaml

            text = cli_file.read_text(encoding="utf-8")
            try:
                config["cli"] = yaml.safe_load(text)
            except yaml.YAMLError:
                config["cli_text"] = text
        config["trainer"] = {
            "strategy": type(trainer.strategy).__name__,
            "precision": str(trainer.precision),
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "max_steps": trainer.max_steps,
            "max_epochs": trainer.max_epochs,
        }
        return config

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective call: every rank must make it
        method = self._method(pl_module)
        self._pending, self._ready, self._step = {}, [], None
        self._t_fit = time.perf_counter()
        experiment_id = None
        if trainer.is_global_zero:
            db = self._open()
            restored = self._restored_id if stage == "fit" else None
            self._restored_id = None
            if restored is not None and db.rows("experiments", id=restored):
                db.mark_dead_runs()  # rows left 'running' by dead processes -> 'crashed' (create_experiment does it otherwise)
                with db.transaction():  # resume: same row, drop rows the interrupted run logged past the checkpoint
                    db.finish_experiment(restored, "running")
                    db.truncate_training_metrics(restored, trainer.global_step)
                experiment_id = restored
            else:
                if restored is not None:
                    rank_zero_warn(f"Experiment {restored} from the checkpoint is not in {self.db_path}; "
                                   "recording a new experiment.")
                config = self._config(trainer, pl_module, log_dir)
                cli = config.get("cli") or {}
                seed = cli.get("seed_everything") if isinstance(cli, dict) else None
                if not isinstance(seed, int) or isinstance(seed, bool):
                    # seed_everything() exports the global seed in this variable (Lightning's own mechanism)
                    seed = int(os.environ["PL_GLOBAL_SEED"]) if os.environ.get("PL_GLOBAL_SEED", "").isdigit() else None
                manifest = collect_manifest()
                hardware = {**manifest["hardware"], "hostname": manifest["hostname"],
                            "platform": manifest["platform"], "python": manifest["python"]}
                experiment_id = db.create_experiment(
                    self.experiment_name, method, config, seed=seed, git_commit=git_commit(),
                    packages=manifest["packages"], hardware=hardware, stage=stage)
            if experiment_id is not None:
                self._record_datasets(db, experiment_id, trainer, stage)
        self.experiment_id = trainer.strategy.broadcast(experiment_id, src=0)
        if hasattr(pl_module, "experiment_id"):
            pl_module.experiment_id = self.experiment_id
            pl_module.experiment_db_path = str(self.db_path)  # where that id lives: other writers use the same database

    @staticmethod
    def _record_datasets(db: ExperimentDB, experiment_id: int, trainer: L.Trainer, stage: str) -> None:
        """The data this stage used (``datamodule.provenance``: source, file sha256, rows, content hash)."""
        splits = {"fit": ("train", "validation"), "test": ("evaluation",)}.get(stage, ())
        for entry in getattr(trainer.datamodule, "provenance", None) or []:
            if entry.get("split") in splits and not db.rows("datasets", experiment_id=experiment_id,
                                                            name=entry["name"], split=entry["split"]):
                db.add_dataset(entry["name"], split=entry["split"], n_rows=entry.get("n_rows"), source=entry.get("source"),
                               sha256=entry.get("sha256"), metadata=entry.get("metadata"), experiment_id=experiment_id)

    def _add(self, step: int, values: Mapping[str, float]) -> None:
        bucket = self._pending.setdefault(step, {})
        for name, value in values.items():
            acc = bucket.setdefault(name, [0.0, 0.0])
            acc[0] += value
            acc[1] += 1

    def _complete(self, before: Optional[int] = None) -> None:
        """Move buffered steps (all, or those < ``before``) to the rows ready for writing."""
        for step in sorted(s for s in self._pending if before is None or s < before):
            for name, (total, count) in self._pending.pop(step).items():
                # times add up over micro-batches; everything else is their mean
                self._ready.append((step, name, total if name == "time/step_s" else total / count))

    def _flush(self) -> None:
        if self._db is None or self.experiment_id is None or not self._ready:
            return
        self._db.log_training_metrics(self.experiment_id, None, self._ready)
        self._db.heartbeat(self.experiment_id)
        self._ready = []

    @staticmethod
    def _train_scalars(trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                       logged: bool = True) -> dict[str, float]:
        """The batch's scalars: ``training_step`` outputs, and with ``logged`` the ``callback_metrics``."""
        values: dict[str, float] = {}
        if isinstance(outputs, Mapping):
            for key, value in outputs.items():
                if (v := _scalar(value)) is not None:
                    values[str(key)] = v
        elif (v := _scalar(outputs)) is not None:
            values["loss"] = v
        if "loss" in values and pl_module.automatic_optimization:
            # Lightning hands on_train_batch_end the loss already divided by accumulate_grad_batches
            values["loss"] *= trainer.accumulate_grad_batches
        if not logged:
            return values
        metrics = trainer.callback_metrics
        for name, value in metrics.items():
            if name.startswith(_EVAL_PREFIXES) or name.endswith("_epoch"):
                continue
            if name.endswith("_step") and name[: -len("_step")] in metrics:
                continue  # the same value also sits under the plain name
            if (v := _scalar(value)) is not None and name not in values:
                values[name] = v
        return values

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "fit")

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        self._step = trainer.global_step + 1  # the optimizer step this batch contributes to
        self._t_batch = time.perf_counter()
        self._lrs = {}  # the learning rate this step uses (read before the scheduler moves it)
        for opt in trainer.optimizers[:1]:
            groups = opt.param_groups
            for g, group in enumerate(groups):
                self._lrs["lr" if len(groups) == 1 else f"lr/pg{g}"] = float(group["lr"])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero or self.experiment_id is None or self._step is None:
            return
        stepped = trainer.global_step >= self._step  # the optimizer stepped on this micro-batch
        values = self._train_scalars(trainer, pl_module, outputs, logged=stepped)
        values["time/step_s"] = time.perf_counter() - self._t_batch
        values["epoch"] = float(trainer.current_epoch)
        values.update(self._lrs)
        if pl_module.device.type == "cuda":
            values["memory/peak_alloc_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 1024**3
        self._add(self._step, {k: v for k, v in values.items() if not math.isnan(v)})
        # this step is complete once the optimizer stepped (global_step caught up); earlier ones always are
        self._complete(before=self._step + 1 if stepped else self._step)
        if len({s for s, _, _ in self._ready}) >= self.log_every_n_steps:
            self._flush()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.experiment_id is None:
            return
        if trainer.state.fn != "fit":
            return
        for name, value in trainer.callback_metrics.items():
            if name.startswith("val") and (v := _scalar(value)) is not None:
                self._ready.append((trainer.global_step, name, v))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.experiment_id is None:
            return
        self._complete()
        self._ready.append((trainer.global_step, "time/fit_s", time.perf_counter() - self._t_fit))
        self._flush()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.experiment_id is None or self._db is None:
            return
        paths: list[tuple[str, str]] = []
        for cb in trainer.checkpoint_callbacks:
            for kind, p in (("checkpoint_best", getattr(cb, "best_model_path", "")),
                            ("checkpoint_last", getattr(cb, "last_model_path", ""))):
                if p and (kind, p) not in paths and Path(p).exists():
                    paths.append((kind, p))
        for kind, p in (getattr(pl_module, "artifact_paths", None) or {}).items():
            paths.append((str(kind), str(p)))
        with self._db.transaction():  # artifacts and the final status land together
            for kind, p in paths:
                self._db.add_artifact(self.experiment_id, kind, p)
            self._db.finish_experiment(self.experiment_id, "finished")
        self._close()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.experiment_id is None or self._db is None:
            return
        self._db.finish_experiment(self.experiment_id, "finished")
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not trainer.is_global_zero:
            return
        if self.experiment_id is None:
            # It failed before the run started (bad input in setup, a model that does not load): nothing
            # ran, so nothing is recorded; the error itself reaches the user.
            self._close()
            return
        stopped = isinstance(exception, (KeyboardInterrupt, SIGTERMException))  # Ctrl-C, or SIGTERM from a scheduler
        status = "interrupted" if stopped else "failed"
        error = f"{type(exception).__name__}: {exception}"
        try:  # recording the failure must never hide the exception that caused it
            db = self._open()
            self._complete()
            self._flush()
            db.finish_experiment(self.experiment_id, status, error=error)
        except Exception as err:
            rank_zero_warn(f"ExperimentDBLogger could not record the {status} run in {self.db_path}: {err}")
        finally:
            self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()
