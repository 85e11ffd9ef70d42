"""GRIT's K-FAC statistics in a Trainer: which tokens count per micro-batch, and the step's metrics.

The arithmetic is :class:`fteval.grit.KFAC` (constructor arguments, defaults and equations there
and in docs/grit.md) and the whole optimizer step is :class:`fteval.grit.GRITOptimizer`, which
``GRITModule.configure_optimizers`` wraps around the configured optimizer with this callback's
K-FAC, the :class:`~callbacks.regularisers.GeometryRegulariser` and the
:class:`~callbacks.reprojection.NeuralReprojection` of the trainer. This callback only schedules
and logs: it starts each micro-batch's statistics, tells the optimizer whether this step's
metrics are wanted, and logs them right after the step. Its state (the factors) is saved in
checkpoints as callback state.

Hook placement (Lightning 2.6, lightning/pytorch/plugins/precision/precision.py and amp.py):
``optimizer.step(closure)`` runs the closure (training_step + backward, then the callbacks'
``on_before_optimizer_step`` and Lightning's own ``gradient_clip_val`` clipping), and under
fp16 AMP ``scaler.unscale_`` runs before that; :meth:`GRITOptimizer.step` then does GRIT's work
on whole (accumulated), unscaled gradients and steps the inner optimizer. So
``trainer.gradient_clip_val`` would clip the loss gradients before GRIT's step, a second clip
besides ``clip_grad_norm``; the GRIT configs leave it null.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fteval.grit import KFAC, GRITOptimizer, damped_cholesky, token_mask_from_batch
from fteval.models.base import is_logging_step
from fteval.models.engine import MicroBatchObserver, training_engine

__all__ = ["KFACPreconditioner", "damped_cholesky", "grit_optimizer", "token_mask_from_batch"]


def _precision_dtype(trainer: Any) -> torch.dtype:
    """The dtype activations have under the trainer's precision ("bf16-mixed" -> bf16, "16-mixed" -> fp16, else fp32)."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def grit_optimizer(trainer: L.Trainer) -> GRITOptimizer | None:
    """The trainer's :class:`GRITOptimizer`, or None."""
    for optimizer in getattr(trainer, "optimizers", []):
        if isinstance(optimizer, GRITOptimizer):
            return optimizer
    return None


def _install(trainer: L.Trainer, pl_module: L.LightningModule) -> GRITOptimizer:
    """Wrap the trainer's one optimizer in a :class:`GRITOptimizer` built from its callbacks (for modules
    that configure a plain optimizer; ``GRITModule`` builds it in ``configure_optimizers``), and
    point its learning-rate schedulers at the wrapper (they share the parameter groups)."""
    optimizers = list(trainer.optimizers)
    if len(optimizers) != 1:
        raise ValueError(f"KFACPreconditioner supports one optimizer; {type(pl_module).__name__} configures {len(optimizers)}.")
    wrapped = GRITOptimizer.from_parts(optimizers[0], trainer.callbacks, pl_module)
    trainer.strategy.optimizers = [wrapped]
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is optimizers[0]:
            config.scheduler.optimizer = wrapped
    return wrapped


class KFACPreconditioner(KFAC, L.Callback):
    """:class:`fteval.grit.KFAC` in a Trainer: the same arguments.

    Logged on Lightning's logging steps (from :attr:`GRITOptimizer.metrics`):
    ``grit/preconditioned_layers``, ``grit/preconditioned_grads``, ``grit/factor_cond_max``,
    ``grit/kfac_ms`` (time in GRIT's work of the step, CUDA-synchronised), ``grit/kfac_hook_ms``
    (host time spent recording statistics since the previous step; no kernels are launched there,
    the arithmetic runs batched in the step), the weighted penalties (``grit/reg_*``) and, on
    reprojection steps, ``grit/reprojected_layers`` and ``grit/effective_rank_mean``.
    """

    _warn = staticmethod(rank_zero_warn)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_optimizers (GRITModule attached this K-FAC and wrapped the optimizer) and a restore
        optimizer = grit_optimizer(trainer)
        if optimizer is None:  # a LightningModule of the user's own: wrap its optimizer here
            optimizer = _install(trainer, pl_module)
        if optimizer.kfac is not self:
            raise ValueError("The trainer's GRITOptimizer uses another KFAC than this KFACPreconditioner; keep one.")
        if self.clip_grad_norm is not None and getattr(trainer, "gradient_clip_val", None):
            rank_zero_warn(
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} clips the loss gradients before GRIT's step "
                f"and KFACPreconditioner clips them again to {self.clip_grad_norm}; set one of them to null "
                "(GRIT's default: clip_grad_norm here, gradient_clip_val null)."
            )
        # The step's metrics are logged right after GRIT's step (inside Lightning's optimizer_step), so every
        # callback's on_train_batch_end, wherever it stands in the list, already sees this step's values.
        self._log_handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._log(opt, pl_module))
        self._observer, self._engine = None, training_engine(pl_module)
        if self._engine is not None and self._engine.runs_backward_in_step:
            # Forward and backward run inside training_step (and a CUDA graph): the statistics are
            # started and added there, on the micro-batch tensors the graph reads.
            self._observer = _StatisticsObserver(self, trainer)
            self._engine.add_micro_batch_observer(self._observer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        handle, self._log_handle = getattr(self, "_log_handle", None), None
        if handle is not None:
            handle.remove()
        observer, self._observer = getattr(self, "_observer", None), None
        if observer is not None:
            self._engine.remove_micro_batch_observer(observer)
        self._engine = None
        self.detach()

    def _begin(self, trainer: L.Trainer, batch: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else None
        self.begin_micro_batch(token_mask_from_batch(batch, self.statistics_tokens), scale, token_shape=shape,
                               slot_dtype=_precision_dtype(trainer))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if getattr(self, "_observer", None) is None:
            self._begin(trainer, batch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Before GRIT's step: whether it assembles its metrics (and CUDA-syncs to time itself).
        Only on the steps Lightning writes to the logger: every self.log costs host time."""
        if isinstance(optimizer, GRITOptimizer):
            optimizer.collect_metrics = is_logging_step(trainer)

    def _log(self, optimizer: GRITOptimizer, pl_module: L.LightningModule) -> None:
        metrics, optimizer.metrics = optimizer.metrics, {}
        if not metrics:
            return  # nothing wanted on this step
        if optimizer.collect_metrics:
            metrics["grit/kfac_hook_ms"] = 1000.0 * self.capture.host_seconds
            self.capture.host_seconds = 0.0
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)


class _StatisticsObserver(MicroBatchObserver):
    """The K-FAC statistics around one micro-batch while the module's engine runs forward and backward
    (``cuda_graph``): started on the batch the forward reads, added to the pending sums right after its backward."""

    def __init__(self, kfac: KFACPreconditioner, trainer: L.Trainer) -> None:
        self.kfac, self.trainer = kfac, trainer

    def before_micro_batch(self, batch: Any) -> None:
        self.kfac._begin(self.trainer, batch)

    def after_micro_batch(self) -> None:
        self.kfac.flush()
