"""A callback that kills its own process with SIGKILL (a real ``kill -9``) at a chosen micro-batch."""

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """SIGKILL at the start of micro-batch ``batch`` (0-based, counted over the whole run)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.completed
        if done >= self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAt(Callback):
    """SIGTERM to its own process at the start of test batch ``batch`` (as a scheduler would send it); counts
    the test batches that start afterwards in ``after``, printed when the run stops."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.after = -1

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.after >= 0:
            self.after += 1
        elif batch_idx >= self.batch:
            self.after = 0
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception) -> None:
        print(f"test batches started after SIGTERM: {self.after}", flush=True)
