"""A training DataLoader that resumes mid-epoch exactly, on one process or under DDP.

Lightning checkpoints a loader's state when the loader implements ``state_dict`` /
``load_state_dict``. Each epoch's order here is a permutation seeded by ``seed + epoch``
(``DistributedSampler``'s own scheme, sharded by rank), not drawn from the global RNG, so an
uninterrupted run and a resumed one see the same batches; on restore, the batches the
interrupted run had already trained on are skipped. Their count comes from the trainer's
progress tracker (batches processed in the epoch), not from the loader, because Lightning
pre-fetches one batch ahead of the training step.

The sampler is a ``DistributedSampler`` on purpose: Lightning then leaves it in place under DDP
instead of wrapping it, and every rank shards the same permutation.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

from torch.utils.data import DataLoader, DistributedSampler


class EpochSeededSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle, seed + epoch) that can start an epoch part-way through."""

    def __init__(self, dataset, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume: Optional[tuple[int, int]] = None  # (epoch, samples of this rank already used)

    def resume(self, epoch: int, samples_done: int) -> None:
        self.set_epoch(epoch)
        self._resume = (epoch, samples_done)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        skip = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        return iter(order[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader whose state (epoch, batches already trained on) travels in Lightning checkpoints."""

    def __init__(self, dataset, *, batch_size: int, seed: int, progress: Callable[[], Optional[tuple[int, int]]],
                 num_replicas: int = 1, rank: int = 0, **kw):
        self.epoch_sampler = EpochSeededSampler(dataset, seed, num_replicas, rank)
        super().__init__(dataset, batch_size=batch_size, sampler=self.epoch_sampler, **kw)
        self._progress = progress

    def state_dict(self) -> dict:
        progress = self._progress()
        epoch, batches_done = progress if progress is not None else (self.epoch_sampler.epoch, 0)
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch_sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)
