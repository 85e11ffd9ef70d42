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
