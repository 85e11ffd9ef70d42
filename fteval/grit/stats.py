"""GRIT's rank-space K-FAC factors: per-layer views, the shared buffers of a group of layers, and the
once-per-step arithmetic on them (accumulate the step's Gram sums, fold them into the factors, refresh
the cached Cholesky factors of the damped factors).

Per layer and side (a: u = A x, g: v = B^T dL/dy), fp32 ``[r, r]``:

* ``pending``: the sum of u u^T (v v^T) over this optimizer step's real tokens, and ``counts`` the
  tokens (:meth:`FactorGroup.accumulate`, fed by :mod:`fteval.grit.capture`);
* ``factors``: S_a = E[u u^T], S_g = E[v v^T]. Once per optimizer step :meth:`FactorGroup.fold`
  merges the step's sums: a token-weighted running mean until that side is first used, then
  ``S <- beta S + (1 - beta) mean(step)`` (``factor_average="ema"``), or the running mean
  throughout (``"mean"``);
* the Cholesky factor of the damped factor, refreshed every ``update_freq`` steps
  (:meth:`FactorGroup.refresh`, with :func:`fteval.grit.solve.damped_cholesky`).

All layers of one (device, rank) share ``[layers, 2, r, r]`` buffers, so each of these is a few
batched operations instead of several per layer; refreshing is one batched fp32 Cholesky/eigvalsh
on the CPU (r x r matrices: cheaper there than hundreds of tiny GPU launches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fteval.grit.layer import GritLoraLinear
from fteval.grit.solve import damped_cholesky

__all__ = ["FactorGroup", "RankSpaceStats"]


class RankSpaceStats:
    """Rank-space K-FAC factors of one :class:`GritLoraLinear`, fp32, on the layer's device.

    ``S_a = E[u u^T]`` with ``u = A dropout(x)`` and ``S_g = E[v v^T]`` with ``v = B^T g``,
    ``g = dL/dy`` of the layer output; both ``[r, r]``, averaged over real (unmasked)
    tokens. The gradient reaching u = A x is ``scaling * v`` (times the AMP loss scale): the
    capture divides both out, so S_g is in units of (dL/dy)^2 whatever alpha, r or the grad
    scaler are.

    Storage: ``factors`` ``[2, r, r]`` (S_a, S_g), ``pending`` ``[2, r, r]`` (sums this
    step), ``counts`` ``[2]`` int64 (tokens this step) and ``tokens`` ``[2]`` float64 (folded
    tokens, read as ``n_a``/``n_g``; on the device, so folding needs no host sync). A
    :class:`FactorGroup` passes views into its shared buffers (``storage=``); without it the
    stats own their tensors (a layer given factors by hand). ``ema_a``/``ema_g``: the side
    has switched from the running mean to the EMA. ``counted`` is the once-per-micro-batch
    flag (gradient checkpointing re-runs forward).
    """

    def __init__(
        self,
        rank: int,
        device: torch.device | str,
        ema_decay: float = 0.95,
        storage: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
        self.rank = int(rank)
        self.ema_decay = float(ema_decay)
        if storage is None:
            storage = (
                torch.zeros(2, self.rank, self.rank, dtype=torch.float32, device=device),
                torch.zeros(2, self.rank, self.rank, dtype=torch.float32, device=device),
                torch.zeros(2, dtype=torch.int64, device=device),
                torch.zeros(2, dtype=torch.float64, device=device),
            )
        self.factors, self.pending, self.counts, self.tokens = storage
        if self.factors.shape != (2, self.rank, self.rank) or self.counts.shape != (2,) or self.tokens.shape != (2,):
            raise ValueError(
                f"RankSpaceStats storage must be [2, {rank}, {rank}] x2, [2] and [2], got {tuple(self.factors.shape)}."
            )
        self.ema_a = False
        self.ema_g = False
        self.counted = False

    # views: S_a/S_g [r, r] folded factors, sum_a/sum_g [r, r] pending sums, cnt_a/cnt_g [] pending counts
    S_a = property(lambda self: self.factors[0], lambda self, v: self.factors[0].copy_(v))
    S_g = property(lambda self: self.factors[1], lambda self, v: self.factors[1].copy_(v))
    sum_a = property(lambda self: self.pending[0])
    sum_g = property(lambda self: self.pending[1])
    cnt_a = property(lambda self: self.counts[0])
    cnt_g = property(lambda self: self.counts[1])
    # folded real tokens per side (reading them synchronises with the device)
    n_a = property(lambda self: int(self.tokens[0]), lambda self, v: self.tokens[0].fill_(float(v)))
    n_g = property(lambda self: int(self.tokens[1]), lambda self, v: self.tokens[1].fill_(float(v)))

    @property
    def device(self) -> torch.device:
        return self.factors.device

    def state_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "ema_decay": self.ema_decay,
            "factors": self.factors.detach().cpu().clone(),
            "pending": self.pending.detach().cpu().clone(),
            "counts": self.counts.detach().cpu().clone(),
            "n_a": self.n_a,
            "n_g": self.n_g,
            "ema_a": self.ema_a,
            "ema_g": self.ema_g,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["rank"]) != self.rank:
            raise ValueError(
                f"K-FAC statistics in the checkpoint have rank {state['rank']} but the layer has rank {self.rank}; "
                "resume with the same LoRA r."
            )
        self.ema_decay = float(state["ema_decay"])
        self.factors.copy_(state["factors"])
        self.pending.copy_(state["pending"])
        self.counts.copy_(state["counts"])
        self.n_a, self.n_g = int(state["n_a"]), int(state["n_g"])
        self.ema_a, self.ema_g = bool(state["ema_a"]), bool(state["ema_g"])


class FactorGroup:
    """GRIT layers of one (device, rank): their statistics and cached Cholesky factors in shared buffers.

    Creating a group gives every layer a :class:`RankSpaceStats` viewing row i of the buffers
    (the statistics a layer already holds from an earlier fit carry over). Side 0 is S_a, side 1 S_g.
    """

    def __init__(self, names: list[str], layers: list[GritLoraLinear], rank: int, ema_decay: float) -> None:
        device = layers[0].lora_A.weight.device
        n = len(layers)
        self.names, self.layers, self.rank, self.device = names, layers, rank, device
        self.factors = torch.zeros(n, 2, rank, rank, dtype=torch.float32, device=device)  # S_a, S_g
        self.pending = torch.zeros_like(self.factors)  # sums of this optimizer step
        self.counts = torch.zeros(n, 2, dtype=torch.int64, device=device)  # tokens of this optimizer step
        self.tokens = torch.zeros(n, 2, dtype=torch.float64, device=device)  # folded tokens (n_a, n_g)
        self.ema = torch.zeros(n, 2, dtype=torch.bool, device=device)  # side in EMA mode (mirrors stats.ema_*)
        self.dropped = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite step was dropped
        self.chol = torch.zeros_like(self.factors)  # cached Cholesky factors of the damped factors
        self.has_chol = [[False, False] for _ in range(n)]
        self.inv_scale = [[1.0, 1.0] for _ in range(n)]
        self.cond = [[float("nan"), float("nan")] for _ in range(n)]
        self.refreshed_at = [[-1, -1] for _ in range(n)]  # optimizer step of the last refresh, -1 = never
        for i, layer in enumerate(layers):
            old = layer.stats
            storage = (self.factors[i], self.pending[i], self.counts[i], self.tokens[i])
            layer.stats = RankSpaceStats(rank, device, ema_decay, storage=storage)
            if old is not None and old.rank == rank:  # statistics of an earlier fit carry over
                layer.stats.load_state_dict(old.state_dict())
                layer.stats.ema_decay = ema_decay
        self.sync_ema()

    def sync_ema(self) -> None:
        """Copy the layers' host-side EMA flags into the device mask the batched fold reads."""
        flags = [[st.ema_a, st.ema_g] for st in (layer.stats for layer in self.layers)]
        self.ema.copy_(torch.tensor(flags, dtype=torch.bool))

    # ------------------------------------------------------------------ capture: this step's sums
    def accumulate(
        self,
        rows: torch.Tensor,
        side: int | None,
        X: torch.Tensor,
        mask: torch.Tensor | None,
        count: torch.Tensor | None,
        scale: float | torch.Tensor,
    ) -> None:
        """Add the Gram matrices of rank-space vectors of layers ``rows`` to their pending sums.

        ``X``: ``[m, tokens, r]`` for one side (``side`` 0: u, 1: v) or ``[m, 2, tokens, r]``
        for both (``side`` None: the (u, du) pairs of compiled layers), any float dtype; the
        Gram matrices are fp32, one batched matmul for all m layers. ``mask``: 0/1 floats
        ``[tokens]`` (any shape with that many entries) or None (every token counts);
        ``count``: its sum (0-dim tensor), or None without a mask. ``scale``: a number or a
        tensor broadcasting against the ``[m, (2,) r, r]`` Gram matrices (1/(LoRA scaling x
        loss scale)^2 for du: it turns du into v). ``rows``: the layers' row indices on the
        group's device.
        """
        X = X.float()
        W = X if mask is None else X * mask.reshape(-1, 1).to(X.dtype)  # masked tokens zeroed, no host sync
        G = W.transpose(-1, -2) @ X  # [m, (2,) r, r]
        if isinstance(scale, torch.Tensor) or scale != 1.0:
            G = G * scale
        pending = self.pending if side is None else self.pending[:, side]
        counts = self.counts if side is None else self.counts[:, side]
        pending.index_add_(0, rows, G.to(self.device))
        if count is None:
            tokens = torch.full(G.shape[:-2], X.shape[-2], dtype=torch.int64, device=self.device)
        else:
            tokens = count.to(device=self.device, dtype=torch.int64).expand(G.shape[:-2]).contiguous()
        counts.index_add_(0, rows, tokens)

    # ------------------------------------------------------------------ once per optimizer step
    def fold(self, ema_decay: float) -> None:
        """All-reduce (DDP) and fold the pending sums into the factors, on the device (no host sync).

        Per layer and side, with n folded tokens and c new ones: S <- n/(n+c) S + sum/(n+c) (the
        token-weighted running mean) while ``ema`` is off, S <- beta S + (1 - beta) sum/c after;
        no new tokens: unchanged. A side whose sums are not finite (fp16 overflow) is dropped for
        this step and ``dropped`` is set.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                torch.distributed.all_reduce(self.pending)
                torch.distributed.all_reduce(self.counts)
        finite = torch.isfinite(self.pending).flatten(2).all(-1)  # [n, 2]
        self.dropped |= ((self.counts > 0) & ~finite).any()
        cnt = torch.where(finite, self.counts, 0).double()  # [n, 2]
        total = (self.tokens + cnt).clamp_min(1.0)
        keep = torch.where(self.ema, ema_decay, self.tokens / total)
        add = torch.where(self.ema, (1.0 - ema_decay) / cnt.clamp_min(1.0), 1.0 / total)
        used = cnt > 0
        keep = torch.where(used, keep, 1.0).float()[..., None, None]
        add = torch.where(used, add, 0.0).float()[..., None, None]
        self.pending.masked_fill_(~finite[..., None, None], 0.0)
        self.factors.mul_(keep).add_(self.pending * add)
        self.tokens += cnt
        self.pending.zero_()
        self.counts.zero_()

    def take_dropped(self) -> bool:
        """Whether a non-finite step was dropped since the last call (reads the device: a sync)."""
        flag = bool(self.dropped)
        self.dropped.zero_()
        return flag

    def refresh(
        self, step: int, update_freq: int, min_samples: int, damping: float, damping_mode: str, ema: bool = True
    ) -> bool:
        """Re-factorise every side that is ready and due (never factorised, or ``update_freq`` steps old).

        ``ema``: a side switches from the running mean to the EMA at its first factorisation
        (False: it stays a cumulative mean, the reference's averaging). Returns True when a
        side got its first factor (which gradients are preconditioned changed).
        """
        stale = [
            (i, side)
            for i in range(len(self.layers))
            for side in (0, 1)
            if not self.has_chol[i][side] or step - self.refreshed_at[i][side] >= update_freq
        ]
        if not stale:
            return False  # the usual step: nothing read from the device
        tokens = self.tokens.tolist()
        due = [(i, side) for i, side in stale if tokens[i][side] >= min_samples]
        if not due:
            return False
        rows = torch.tensor([d[0] for d in due], device=self.device)
        sides = torch.tensor([d[1] for d in due], device=self.device)
        chol, inv_scale, cond, ok = damped_cholesky(self.factors[rows, sides].cpu(), damping, damping_mode)
        good = [j for j, flag in enumerate(ok.tolist()) if flag]  # degenerate sides keep their previous cache
        if not good:
            return False
        first = any(not self.has_chol[due[j][0]][due[j][1]] for j in good)
        sel = torch.tensor(good)
        self.chol[rows[sel.to(self.device)], sides[sel.to(self.device)]] = chol[sel].to(self.device)
        inv_list, cond_list = inv_scale.tolist(), cond.tolist()
        for j in good:
            i, side = due[j]
            self.has_chol[i][side] = True
            self.inv_scale[i][side] = inv_list[j]
            self.cond[i][side] = cond_list[j]
            self.refreshed_at[i][side] = step
            if ema:  # running mean until first use, EMA after
                setattr(self.layers[i].stats, "ema_" + "ag"[side], True)
        self.sync_ema()
        return first

    def conds(self) -> list[float]:
        """Condition numbers of every cached damped factor."""
        return [self.cond[i][side] for i in range(len(self.layers)) for side in (0, 1) if self.has_chol[i][side]]

    # ------------------------------------------------------------------ state
    def side_state(self, i: int, side: int) -> dict[str, Any]:
        return {
            "chol": self.chol[i, side].detach().cpu().clone() if self.has_chol[i][side] else None,
            "inv_scale": self.inv_scale[i][side],
            "cond": self.cond[i][side],
            "refreshed_at": self.refreshed_at[i][side],
        }

    def load_side_state(self, i: int, side: int, state: Mapping[str, Any]) -> None:
        self.has_chol[i][side] = state["chol"] is not None
        if state["chol"] is not None:
            self.chol[i, side].copy_(state["chol"])
        self.inv_scale[i][side] = float(state["inv_scale"])
        self.cond[i][side] = float(state["cond"])
        self.refreshed_at[i][side] = int(state["refreshed_at"])
