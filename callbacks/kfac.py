"""K-FAC natural-gradient preconditioning of GRIT's LoRA factors, as a Lightning callback.

The arithmetic is :class:`fteval.grit.KFAC` (constructor arguments, defaults and equations
there and in docs/grit.md); this file adds the Lightning hooks. The callback owns GRIT's work
between backward and the optimizer step, in GRIT's order, so the callbacks' order in the
trainer does not matter: a :class:`~callbacks.regularisers.GeometryRegulariser` registers its
penalties here and they are added first, then K-FAC clips, folds, refreshes and preconditions.

Hook placement (Lightning 2.6, lightning/pytorch/plugins/precision/precision.py and amp.py):
``optimizer.step(closure)`` runs the closure (training_step + backward), then
``Precision._after_closure`` calls the callbacks' ``on_before_optimizer_step``, then
``_clip_gradients``; only after that does the optimizer update the parameters. Under fp16
AMP, ``MixedPrecision.optimizer_step`` calls ``scaler.unscale_(optimizer)`` *before*
``_after_closure``. So :meth:`KFACPreconditioner.on_before_optimizer_step` sees whole
(accumulated), unscaled gradients, before Lightning's clipping and before the step: the
place where editing ``.grad`` counts. ``trainer.gradient_clip_val`` therefore clips the
*preconditioned* gradients; ``clip_grad_norm`` (default 1.0) clips before preconditioning,
as the reference does.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from fteval.grit import KFAC, damped_cholesky, token_mask_from_batch
from fteval.models.base import is_logging_step

__all__ = ["KFACPreconditioner", "damped_cholesky", "token_mask_from_batch"]


def _precision_dtype(trainer: Any) -> torch.dtype:
    """The dtype activations have under the trainer's precision ("bf16-mixed" -> bf16, "16-mixed" -> fp16, else fp32)."""
    precision = str(getattr(trainer, "precision", "32-true"))
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class KFACPreconditioner(KFAC, L.Callback):
    """:class:`fteval.grit.KFAC` in a Trainer: the same arguments, statistics attached at fit start.

    Logged on Lightning's logging steps: ``grit/preconditioned_layers``,
    ``grit/preconditioned_grads``, ``grit/factor_cond_max`` (:meth:`optimizer_step_work`),
    ``grit/kfac_ms`` (time in the K-FAC work of this hook, CUDA-synchronised),
    ``grit/kfac_hook_ms`` (host time spent recording statistics since the previous step; no
    kernels are launched there, the arithmetic runs batched in this hook) and the registered
    penalties' values (``grit/reg_*``).
    """

    _warn = staticmethod(rank_zero_warn)
    _penalties: tuple = ()  # GeometryRegulariser callbacks registered for this fit

    def add_penalties(self, penalties: Any) -> None:
        """Have ``penalties.apply(step)`` add its gradients at the start of every optimizer step's work."""
        if penalties not in self._penalties:
            self._penalties = (*self._penalties, penalties)

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after configure_model (layers exist), strategy.setup (on device) and a checkpoint restore
        if self.clip_grad_norm is not None and getattr(trainer, "gradient_clip_val", None):
            rank_zero_warn(
                f"KFACPreconditioner clips gradients to {self.clip_grad_norm} before preconditioning and "
                f"trainer.gradient_clip_val={trainer.gradient_clip_val} clips them again after it; set one of "
                "them to null (GRIT's default: clip_grad_norm here, gradient_clip_val null)."
            )
        self.attach(pl_module)
        self._graph_hook = None
        if getattr(pl_module, "cuda_graph_enabled", False):
            # Forward and backward run inside training_step (and a CUDA graph): the statistics are
            # started and added there, on the micro-batch tensors the graph reads.
            self._graph_hook = _MicroBatchHook(self, trainer)
            pl_module.add_micro_batch_hook(self._graph_hook)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        hook, self._graph_hook = getattr(self, "_graph_hook", None), None
        if hook is not None and hasattr(pl_module, "remove_micro_batch_hook"):
            pl_module.remove_micro_batch_hook(hook)
        self.detach()
        self._penalties = ()

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
        if getattr(self, "_graph_hook", None) is None:
            self._begin(trainer, batch)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """GRIT's work on whole, unscaled gradients before the optimizer step: penalties, then K-FAC."""
        values: dict[str, Any] = {}
        for penalties in self._penalties:
            values.update(penalties.apply(trainer.global_step))
        # Metrics (and the CUDA syncs that make kfac_ms a true duration, which stall the launch queue)
        # only on the steps Lightning writes to the logger: every self.log costs host time (BENCHMARKS.md).
        log_now = is_logging_step(trainer)
        cuda = log_now and any(group.device.type == "cuda" for group in self.groups)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        on_cpu = all(group.device.type == "cpu" for group in self.groups)
        metrics = self.optimizer_step_work(optimizer, check_finite=cuda or on_cpu, metrics=log_now)
        if not log_now:
            return
        if cuda:
            torch.cuda.synchronize()
        metrics["grit/kfac_ms"] = 1000.0 * (time.perf_counter() - t0)
        metrics["grit/kfac_hook_ms"] = 1000.0 * self.capture.host_seconds
        self.capture.host_seconds = 0.0
        for key, value in {**values, **metrics}.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)


class _MicroBatchHook:
    """The K-FAC statistics around one micro-batch under ``cuda_graph`` (``AdapterModule.add_micro_batch_hook``):
    started on the batch the forward reads, added to the pending sums right after its backward."""

    def __init__(self, kfac: KFACPreconditioner, trainer: L.Trainer) -> None:
        self.kfac, self.trainer = kfac, trainer

    def before(self, batch: Any) -> None:
        self.kfac._begin(self.trainer, batch)

    def after(self) -> None:
        self.kfac.flush()
