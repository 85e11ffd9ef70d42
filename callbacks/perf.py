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


class GarbageCollection(L.Callback):
    """Keeps Python's garbage collector from pausing training steps.

    A full (generation-2) collection walks every tracked Python object; with a transformers
    model, Lightning and their modules loaded it pauses a step every few dozen steps, on the CPU
    and on a GPU host alike (BENCHMARKS.md has the measured pauses). At train start this callback
    runs one full collection and then ``gc.freeze()``: everything alive (the model, its modules,
    the libraries) moves to the permanent generation, which later collections skip.
    Objects are still freed by reference counting as usual; only cycles among the frozen objects
    are never collected, and those live for the whole run anyway.

    Args:
        collect_every_n_steps: None (default) keeps automatic collection on. An int n turns it
            off during training and collects the young generations (``gc.collect(1)``) every n
            optimizer steps instead, as torchtitan does, so no collection lands inside a step.

    At train end (or on an exception) the collector's state is restored (``gc.unfreeze()``,
    automatic collection back on if it was on).
    """

    def __init__(self, collect_every_n_steps: int | None = None) -> None:
        if collect_every_n_steps is not None and (
            isinstance(collect_every_n_steps, bool) or not isinstance(collect_every_n_steps, int)
            or collect_every_n_steps < 1
        ):
            raise ValueError(
                f"collect_every_n_steps must be a positive integer or null (automatic collection), "
                f"got {collect_every_n_steps!r}."
            )
        self.collect_every_n_steps = collect_every_n_steps
        self._was_enabled: bool | None = None
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        import gc

        gc.collect()
        gc.freeze()
        self._was_enabled = gc.isenabled()
        self._last_step = trainer.global_step
        if self.collect_every_n_steps is not None:
            gc.disable()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import gc

        n = self.collect_every_n_steps
        step = trainer.global_step
        if n is None or step == self._last_step:  # automatic collection, or still accumulating
            return
        self._last_step = step
        if step % n == 0:
            gc.collect(1)

    def _restore(self) -> None:
        import gc

        if self._was_enabled is None:
            return
        gc.unfreeze()
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()
