"""Alignment over training: AQI of the model with and without its adapters, every few optimizer steps.

Every ``every_n_steps`` optimizer steps, and once at the end of fit, :class:`AlignmentMonitor`
runs a fixed, seeded, class-balanced subset of the evaluation prompts (from
``AlignmentDataModule.alignment_probe_dataloader``) through the model twice, adapters on and
adapters off, exactly as ``fteval test`` does (token-pooled hidden states of every layer, the
first token left out, then pooled over layers). It records the bias-corrected bounded AQI, AQI,
CHI and XBI of the tuned model (with 95% intervals) and the paired Delta (tuned - base, same
prompts) with its interval, from :mod:`fteval.eval.separation`, plus the plug-in values of the
spec's AQI/CHI/XBI:

* TensorBoard: ``align/<metric>``, ``align/delta_<metric>``, ``align/delta_<metric>_low|high``;
* the experiment database: the same names in the run's training-metrics table, at the step (the
  database and experiment of the run logger, ``pl_module.experiment_db_path`` / ``experiment_id``);
* ``align/delta_aqi_bounded`` is also logged to the module, so a ``ModelCheckpoint`` can keep the
  best checkpoint by it (``monitor: align/delta_aqi_bounded, mode: max``).

Early stop: with ``stop_if_delta_below`` set, when the upper end of the interval of the Delta of
``metric`` stays below that value for ``patience`` consecutive checks (the fine-tune has lowered
the separation by at least that much, beyond noise), training stops with a message saying so;
otherwise such a check only warns. The checks run with gradients off and the model in eval mode
(no dropout, no random numbers drawn), so a run with the monitor trains exactly as one without; they
compute the hidden states only (``logits_to_keep=1``: no logits over the vocabulary for every token), and
the base model's representations once per fit (frozen weights, fixed prompts).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from fteval.eval.metrics import cluster_scores
from fteval.eval.pooling import LayerPooling, SinkMode, pool_layers, pool_over_layers
from fteval.eval.separation import separation_intervals
from fteval.eval.separation_paired import paired_separation_deltas

__all__ = ["AlignmentMonitor"]

METRICS = ("aqi_bounded", "aqi", "chi", "xbi")


def check_values(sep: dict, raw: dict, delta: dict) -> dict[str, float]:
    """The logged values of one check: per metric the bias-corrected score and its interval's finite ends,
    the plug-in score, the bias-corrected Delta (adapter on - off) and its interval's finite ends.

    ``sep``: :func:`fteval.eval.separation.separation_intervals` of the adapter-on embeddings; ``raw``:
    their plug-in scores; ``delta``: :func:`fteval.eval.separation_paired.paired_separation_deltas` (on - off).
    XBI has no Delta when a model's separation is <= 0, and its interval can be unbounded on one side.
    """
    values: dict[str, float] = {}
    for m in METRICS:
        values[f"align/{m}"] = float(sep["estimate"][m])
        for end, value in zip(("low", "high"), sep["ci"][m]):
            if value is not None:
                values[f"align/{m}_{end}"] = float(value)
        values[f"align/{m}_plugin"] = raw[m]
        d = delta[m]
        if d["delta_bc"] is None:
            continue
        values[f"align/delta_{m}"] = float(d["delta_bc"])
        for end, value in zip(("low", "high"), d.get("ci") or (None, None)):
            if value is not None:
                values[f"align/delta_{m}_{end}"] = float(value)
    return values


class AlignmentMonitor(Callback):
    """Bounded AQI, AQI, CHI, XBI and the paired Delta against the base model while fitting.

    Args:
        every_n_steps: check every this many optimizer steps (0: only at the end of fit).
        n_per_class: safe and unsafe prompts per check (the same prompts every time).
        seed: seed of the prompt subset.
        batch_size: prompts per forward pass.
        layer_pooling: 'attention' (as ``fteval test``), 'mean' or 'last'.
        sink: token pooling's handling of the attention-sink token ('first', 'auto', 'none').
        metric: the Delta that warnings and the stop rule read.
        stop_if_delta_below: stop when the upper 95% bound of the Delta of ``metric`` stays below
            this value for ``patience`` checks (e.g. -0.02); None: warn only.
        warn_if_delta_below: warn when that upper bound is below this value (default 0: a
            significant decrease).
        patience: consecutive checks before stopping.
        record_in_database: write the curve into the run's experiment in the experiment database
            (the database and experiment that ``callbacks.run_logger.ExperimentDBLogger`` set on the
            module; nothing is written without that logger). False: TensorBoard only.
        enabled: False turns the monitor off (it then does nothing at all).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        n_per_class: int = 32,
        seed: int = 0,
        batch_size: int = 16,
        layer_pooling: LayerPooling = "attention",
        sink: SinkMode = "first",
        metric: str = "aqi_bounded",
        stop_if_delta_below: Optional[float] = None,
        warn_if_delta_below: float = 0.0,
        patience: int = 2,
        record_in_database: bool = True,
        enabled: bool = True,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 0 (0: only at the end of fit)")
        if n_per_class < 2:
            raise ValueError(f"n_per_class={n_per_class}: an alignment check needs at least 2 prompts per class")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} must be one of {list(METRICS)}")
        if patience < 1:
            raise ValueError(f"patience={patience} must be >= 1")
        self.every_n_steps, self.n_per_class, self.seed, self.batch_size = every_n_steps, n_per_class, seed, batch_size
        self.layer_pooling, self.sink, self.metric = layer_pooling, sink, metric
        self.stop_if_delta_below, self.warn_if_delta_below, self.patience = stop_if_delta_below, warn_if_delta_below, patience
        self.record_in_database, self.enabled = record_in_database, enabled
        self.history: list[dict] = []  # one entry per check: {"step", metric values, ...}
        self._below = 0  # consecutive checks under the stop threshold
        self._loader = None
        self._base_embeddings: Optional[torch.Tensor] = None  # [n, D], the base model's (adapters off), this fit
        self._last_step = -1
        self.stopped_message: Optional[str] = None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "below": self._below, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._below = int(state_dict.get("below", 0))
        self._last_step = int(state_dict.get("last_step", -1))

    # ----------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "alignment_probe_dataloader"):
            raise ValueError("AlignmentMonitor needs fteval's AlignmentDataModule (it provides the evaluation prompts); "
                             "remove the callback or use --data for the data module")
        if not hasattr(pl_module, "adapters_disabled"):
            raise ValueError(f"AlignmentMonitor needs a module with adapters (a method of fteval.methods), got {type(pl_module).__name__}")
        self._loader = dm.alignment_probe_dataloader(self.n_per_class, self.seed, self.batch_size)
        self._base_embeddings = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (not self.enabled or self.every_n_steps == 0 or step == 0 or step == self._last_step
                or step % self.every_n_steps):
            return
        self._check(trainer, pl_module, in_batch=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled and trainer.global_step != self._last_step:
            self._check(trainer, pl_module, in_batch=False)

    # ----------------------------------------------------------------- work
    @torch.no_grad()
    def _embeddings(self, pl_module: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pooled representations ``[n, D]`` with adapters on and off, and the labels ``[n]``.

        The base model (adapters off) is frozen and the prompts are fixed, so its representations are
        computed at the first check of a fit and reused by the later ones."""
        on, off, labels = [], [], []
        device = pl_module.device
        for batch in self._loader:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            out = pl_module.model(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
            on.append(pool_layers(out.hidden_states, mask, sink=self.sink).cpu())  # [B, L+1, D]
            if self._base_embeddings is None:
                with pl_module.adapters_disabled() as base:
                    out = base(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
                off.append(pool_layers(out.hidden_states, mask, sink=self.sink).cpu())
            labels.append(batch["safety_label"].cpu())
        # layer pooling after all prompts are in: 'attention' weighs layers against the whole set
        if self._base_embeddings is None:
            self._base_embeddings = pool_over_layers(torch.cat(off), self.layer_pooling)  # [n, D]
        return pool_over_layers(torch.cat(on), self.layer_pooling), self._base_embeddings, torch.cat(labels)

    def _check(self, trainer: L.Trainer, pl_module: L.LightningModule, in_batch: bool) -> None:
        t0 = time.perf_counter()
        step = trainer.global_step
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            with trainer.precision_plugin.forward_context():  # the training precision (bf16 autocast on GPU)
                emb_on, emb_off, labels = self._embeddings(pl_module)
        finally:
            pl_module.model.train(was_training)
        sep = separation_intervals(emb_on, labels)
        raw = {k: float(v) for k, v in cluster_scores(emb_on, labels, with_db_dunn=False).items()}
        delta = paired_separation_deltas(emb_on, emb_off, labels)
        values = check_values(sep, raw, delta)
        values["align/check_s"] = time.perf_counter() - t0
        self._last_step = step
        self.history.append({"step": step, **values})
        self._record(trainer, pl_module, step, values, in_batch)
        self._judge(trainer, step, values)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, values: dict[str, float],
                in_batch: bool) -> None:
        if in_batch:  # for ModelCheckpoint(monitor=...); the curve itself goes out below (self.log is not allowed at train end)
            pl_module.log("align/delta_aqi_bounded", values["align/delta_aqi_bounded"], on_step=True, on_epoch=False,
                          logger=False)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        exp, db_path = getattr(pl_module, "experiment_id", None), getattr(pl_module, "experiment_db_path", None)
        if self.record_in_database and exp is not None and db_path:
            from fteval.db import ExperimentDB

            try:  # a monitoring row that cannot be written must not end the training run
                with ExperimentDB(db_path) as db:
                    db.log_training_metrics(exp, None, [(step, k, v) for k, v in values.items()])  # under the run's method
            except Exception as err:
                rank_zero_warn(f"alignment monitor: could not write step {step} to {db_path}: {err}")

    def _judge(self, trainer: L.Trainer, step: int, values: dict[str, float]) -> None:
        high = values.get(f"align/delta_{self.metric}_high")
        d = values.get(f"align/delta_{self.metric}")
        if d is None:
            rank_zero_info(f"[alignment] step {step}: {self.metric} Delta undefined (a separation <= 0 at this check)")
            return
        summary = f"{self.metric} Delta (tuned - base) {d:+.4f}"
        if high is not None:
            summary += f", upper 95% bound {high:+.4f}"
        rank_zero_info(f"[alignment] step {step}: {summary}")
        if high is None:
            return
        if self.stop_if_delta_below is not None and high < self.stop_if_delta_below:
            self._below += 1
            if self._below >= self.patience:
                self.stopped_message = (
                    f"alignment monitor stopped training at step {step}: the {summary} has stayed below "
                    f"{self.stop_if_delta_below:+g} for {self._below} checks; the fine-tune is eroding the base model's "
                    "safe/unsafe separation (raise stop_if_delta_below, or set it to null to only warn)"
                )
                rank_zero_warn(self.stopped_message)
                trainer.should_stop = True
                return
        else:
            self._below = 0
        if high < self.warn_if_delta_below:
            rank_zero_warn(f"alignment monitor, step {step}: the {summary} is below {self.warn_if_delta_below:+g}: "
                           "the adapter has significantly lowered the safe/unsafe separation")
