"""Check that every rank ends training with the same adapter parameters (DDP sanity check)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import lightning as L
import torch


class RankConsistencyCheck(L.Callback):
    """At the end of fit, all-gather a digest of the trainable parameters and fail if ranks disagree.

    Args:
        dump_dir: also write each rank's trainable parameters to ``<dump_dir>/rank<r>.pt``
            (for tests and debugging).
    """

    def __init__(self, dump_dir: Optional[str] = None) -> None:
        self.dump_dir = dump_dir
        self.digest: Optional[str] = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = {n: p.detach().cpu() for n, p in pl_module.named_parameters() if p.requires_grad}
        h = hashlib.sha256()
        for name in sorted(params):
            h.update(name.encode())
            h.update(params[name].contiguous().float().numpy().tobytes())
        self.digest = h.hexdigest()
        # First 8 bytes of the digest as an int64 tensor: equal digests <=> equal tensors (w.h.p.).
        local = torch.tensor([int(self.digest[:15], 16)], dtype=torch.int64, device=pl_module.device)
        gathered = trainer.strategy.all_gather(local).reshape(-1).tolist()
        if self.dump_dir:
            Path(self.dump_dir).mkdir(parents=True, exist_ok=True)
            torch.save(params, Path(self.dump_dir) / f"rank{trainer.global_rank}.pt")
        if len(set(gathered)) != 1:
            raise RuntimeError(f"adapter parameters differ across ranks after training (digests {gathered})")
