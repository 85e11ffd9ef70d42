"""Training progress bars that count a run set by ``max_steps`` correctly.

fteval's configs stop training by optimizer steps (``max_steps``, no ``max_epochs``) and
accumulate gradients over micro-batches. Lightning 2.6's bars then show "Epoch 0/-2" (Rich: the
description is ``max_epochs - 1`` with ``max_epochs == -1``) and a total of ``max_steps`` batches
while the bar counts micro-batches, so a 30-step run with 2-batch accumulation ends at "60/30".
These subclasses change only those two things; ``fteval fit`` adds the Rich one (or the tqdm one
where ``rich`` is not installed) when the config lists no progress bar.
"""

from __future__ import annotations

from typing import Union

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE

__all__ = ["StepRichProgressBar", "StepTQDMProgressBar", "default_progress_bar"]


def _train_total(trainer) -> Union[int, float]:
    """Micro-batches of this epoch the bar will count: all of them, or as many as ``max_steps`` allows."""
    if trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
        remaining = (trainer.max_steps - trainer.global_step) * max(1, int(trainer.accumulate_grad_batches))
        # The bar counts from the start of the epoch; a resumed run starts part-way through it.
        loop = getattr(trainer, "fit_loop", None)
        done = loop.epoch_loop.batch_progress.current.completed if loop is not None else 0
        return min(trainer.num_training_batches, done + remaining)
    return trainer.num_training_batches


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar; with ``max_steps`` and no ``max_epochs``: "Epoch N" and a micro-batch total."""

    @property
    def total_train_batches(self) -> Union[int, float]:
        return _train_total(self.trainer)

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs not in (None, -1):
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        width = len(self.validation_description)  # the same padding as Lightning's: no flicker
        return f"{description:{width}}" if width > len(description) else description


class StepTQDMProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the micro-batch total of :class:`StepRichProgressBar`."""

    @property
    def total_train_batches(self) -> Union[int, float]:
        return _train_total(self.trainer)


def default_progress_bar() -> ProgressBar:
    """The bar ``fteval fit`` adds when the config names none: Rich where installed, else tqdm (as Lightning)."""
    return StepRichProgressBar() if _RICH_AVAILABLE else StepTQDMProgressBar()
