"""Per-step speed and memory: tokens/s, seconds per optimizer step, peak memory (CUDA or process RSS)."""

from __future__ import annotations

import time

import lightning as L
import psutil
import torch


class TrainingSpeedMonitor(L.Callback):
    """Logs ``perf/tokens_per_s`` (real, unpadded tokens), ``perf/step_s`` and ``perf/peak_mem_gib``.

    Times cover whole optimizer steps (all accumulated micro-batches); peak memory is
    ``torch.cuda.max_memory_allocated`` on GPU and the process resident set size on CPU.
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._tokens = 0
        self._last_step = -1
        self.total_tokens = 0
        self.total_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # resume-safe: count steps from where training starts

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()
        self._tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:  # still accumulating
            return
        self._last_step = trainer.global_step
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        tokens = self._tokens * trainer.world_size
        self.total_tokens += tokens
        self.total_seconds += dt
        if torch.cuda.is_available():
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = psutil.Process().memory_info().rss / 2**30
        pl_module.log_dict(
            {"perf/tokens_per_s": tokens / dt, "perf/step_s": dt, "perf/peak_mem_gib": peak},
            on_step=True, on_epoch=False,
        )
        self._t0, self._tokens = None, 0

    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_seconds": self.total_seconds}

    def load_state_dict(self, state_dict: dict) -> None:
        self.total_tokens = state_dict["total_tokens"]
        self.total_seconds = state_dict["total_seconds"]
