"""callbacks.perf.GarbageCollection: the collector frozen during training, restored afterwards."""

from __future__ import annotations

import gc

import lightning as L
import pytest
import torch

from callbacks.perf import GarbageCollection


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.seen: list[tuple[int, bool]] = []  # (frozen objects, automatic collection on) per step

    def training_step(self, batch, batch_idx):
        self.seen.append((gc.get_freeze_count(), gc.isenabled()))
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(12, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _fit(tmp_path, callback, max_steps=6):
    module = _Tiny()
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback],
                        accelerator="cpu")
    trainer.fit(module)
    return module


def test_objects_are_frozen_while_training_and_released_after(tmp_path):
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    module = _fit(tmp_path, GarbageCollection())
    assert len(module.seen) == 6
    assert all(frozen > 1000 and enabled for frozen, enabled in module.seen)  # the model, torch, Lightning...
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_periodic_collection_turns_automatic_collection_off_then_back_on(tmp_path, monkeypatch):
    collected: list[int] = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda generation=2: collected.append(generation) or real_collect(generation))
    module = _fit(tmp_path, GarbageCollection(collect_every_n_steps=2))
    assert all(not enabled for _, enabled in module.seen)
    assert collected == [2, 1, 1, 1]  # one full collection at train start, then gen 1 after steps 2, 4, 6
    assert gc.isenabled() and gc.get_freeze_count() == 0


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "10"])
def test_bad_collection_interval_is_refused(bad):
    with pytest.raises(ValueError, match="collect_every_n_steps must be a positive integer"):
        GarbageCollection(collect_every_n_steps=bad)


def test_collector_is_restored_when_training_fails(tmp_path):
    class Failing(_Tiny):
        def training_step(self, batch, batch_idx):
            if batch_idx == 2:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[GarbageCollection(collect_every_n_steps=1)], accelerator="cpu")
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(Failing())
    assert gc.isenabled() and gc.get_freeze_count() == 0
