"""A training DataLoader that resumes mid-epoch exactly.

Lightning checkpoints a loader's state when the loader implements ``state_dict`` /
``load_state_dict``. The order of each epoch here is a permutation seeded by ``(seed, epoch)``
rather than by the global RNG, so an uninterrupted run and a resumed one draw the same batches;
on restore, the batches the interrupted run had already trained on are skipped. The count of
those batches comes from the trainer's own progress tracker (batches processed in the epoch),
not from the loader, because Lightning pre-fetches one batch ahead of the training step.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``; can start an epoch part-way through."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples already used in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch, self._resume = epoch, (epoch, samples_done)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.n


class ResumableDataLoader(DataLoader):
    """DataLoader whose state (epoch, batches already trained on) travels in Lightning checkpoints."""

    def __init__(self, dataset, *, batch_size: int, seed: int, progress: Callable[[], Optional[tuple[int, int]]], **kw):
        self.epoch_sampler = EpochSeededSampler(len(dataset), seed)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kw)
        self._progress = progress

    def state_dict(self) -> dict:
        progress = self._progress()
        epoch, batches_done = progress if progress is not None else (self.epoch_sampler.epoch, 0)
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)
