"""The runs of ``fteval bench train``: one method for warm-up + timed optimizer steps on the shared base.

* :class:`RunSpec`: what one run is (method, batch, sequence, options);
* :func:`run_method`: builds the synthetic batches (:class:`SyntheticLM`), runs ``plain`` (peft +
  PyTorch, :func:`_plain_run`) or a method of :mod:`fteval.methods` (its module in a Lightning
  ``Trainer``, :func:`_lightning_run`), marks the end of every optimizer step (:class:`StepClock`) and returns the
  run's row (step times, tokens/s, memory, losses, GRIT's periodic costs);
* :func:`strip_adapters` / :func:`restore_base`: the bare base back after each run;
* :func:`longest_trainable`: the longest sequence a method trains at (doubling, then bisection).

The method (what is timed and why) is in :mod:`fteval.bench.train`.
"""

from __future__ import annotations

import gc
import time
import traceback
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fteval.bench.common import BenchModel, free_memory, peak_memory_gib, reset_peak_memory, synchronize, timing_summary
from fteval.bench.train_ratios import PLAIN
from fteval.models.base import DEFAULT_TARGETS
from fteval.models.engine import TrainingEngine

__all__ = ["RunSpec", "StepClock", "SyntheticLM", "longest_trainable", "restore_base", "run_method", "strip_adapters"]

LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05  # the modules' defaults, used by every method
GRIT_UPDATE_FREQ = 20  # spec: K-FAC inverse refresh every 20 optimizer steps
GRIT_REPROJECT_EVERY = 40  # spec: reprojection every 40 optimizer steps
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class RunSpec:
    """One run: ``method`` for ``warmup`` untimed and ``steps`` timed optimizer steps of ``batch_size`` rows.

    The options are those of :class:`fteval.bench.train.TrainBenchSettings` (one value each here).
    """

    method: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    steps: int
    warmup: int
    seed: int = 0
    lr: float = LEARNING_RATE
    min_seq_len: Optional[int] = None
    padding_free: bool = False
    compile_blocks: bool = False
    gc_freeze: bool = False
    fused_loss: str = "off"
    activation_offload: bool = False
    cuda_graph: bool = False


# ----------------------------------------------------------------------------------------------
# data and timing
# ----------------------------------------------------------------------------------------------


class SyntheticLM(Dataset):
    """``n`` rows of random token ids; every token real and in the loss (labels = input_ids).

    With ``min_len`` None every row has ``seq_len`` tokens (tokens per step = batch x seq_len).
    Otherwise row lengths are drawn uniformly from ``[min_len, seq_len]`` (like real
    instruction data), and the loader pads each batch to its longest row or flattens it
    (``padding_free``). Deterministic in ``seed``.
    """

    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int = 0, min_len: Optional[int] = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(vocab_size, (n, seq_len), generator=gen)  # [n, seq]
        if min_len is None:
            self.lengths = [seq_len] * n
        else:
            self.lengths = torch.randint(min_len, seq_len + 1, (n,), generator=gen).tolist()
        self.variable = min_len is not None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[i, : self.lengths[i]]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    def real_tokens(self, batch_size: int, first_batch: int) -> float:
        """Mean real tokens per batch from batch ``first_batch`` on (the timed steps)."""
        batches = [self.lengths[i : i + batch_size] for i in range(0, len(self.lengths), batch_size)][first_batch:]
        return sum(sum(b) for b in batches) / max(len(batches), 1)

    def collate(self, padding_free: bool):
        """Batches as the DataModule builds them: padded to the longest row, or one padding-free row."""
        from fteval.data.formatting import flatten_batch, pad_batch

        if padding_free:
            return flatten_batch
        if not self.variable:
            return None  # equal lengths: the default collate stacks them

        def pad(features: list[dict]) -> dict:
            return pad_batch([{"input_ids": f["input_ids"].tolist(), "labels": f["labels"].tolist()} for f in features], 0)

        return pad


class StepClock:
    """Marks the end of every optimizer step (after a device sync); optionally advances a profiler."""

    def __init__(self, device: torch.device, profiler: Any = None) -> None:
        self.device = device
        self.profiler = profiler
        self.marks: list[float] = []
        self.losses: list[torch.Tensor] = []

    def mark(self, loss: Optional[torch.Tensor]) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())
        if isinstance(loss, torch.Tensor):
            self.losses.append(loss.detach())
        if self.profiler is not None:
            self.profiler.step()

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (needs warmup >= 1: the first mark is a start)."""
        marks = self.marks[warmup - 1 :]
        return [b - a for a, b in zip(marks, marks[1:])]


def _lightning_callbacks():
    import lightning as L

    class ClockCallback(L.Callback):
        def __init__(self, clock: StepClock) -> None:
            self.clock = clock

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            self.clock.mark(loss)

    class GritCostProbe(L.Callback):
        """At the end of training (model still on its device): time one forced K-FAC refresh and one reprojection."""

        def __init__(self, kfac, reproj, device: torch.device, repeats: int = 3) -> None:
            self.kfac, self.reproj, self.device, self.repeats = kfac, reproj, device, repeats
            self.costs: dict[str, float] = {}

        def _time(self, fn) -> float:
            times = []
            for _ in range(self.repeats):
                synchronize(self.device)
                t0 = time.perf_counter()
                fn()
                synchronize(self.device)
                times.append(1000.0 * (time.perf_counter() - t0))
            return sorted(times)[len(times) // 2]

        def on_train_end(self, trainer, pl_module) -> None:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            saved = self.kfac.update_freq
            try:
                self.kfac.update_freq = 1  # every side is due: fold + refresh all + precondition
                forced = self._time(lambda: self.kfac.optimizer_step_work(optimizer))
                self.kfac.update_freq = 10**9  # none due: fold + precondition (what every step pays)
                normal = self._time(lambda: self.kfac.optimizer_step_work(optimizer))
            finally:
                self.kfac.update_freq = saved
            reproj_ms = self._time(lambda: self.reproj.reproject(pl_module, trainer.optimizers))
            self.costs = {
                "kfac_step_work_ms": normal,
                "kfac_refresh_ms": max(forced - normal, 0.0),
                "reprojection_ms": reproj_ms,
            }
            kfac_ms = trainer.callback_metrics.get("grit/kfac_ms")
            if kfac_ms is not None:
                self.costs["kfac_ms_last_step"] = float(kfac_ms)

    return ClockCallback, GritCostProbe


# ----------------------------------------------------------------------------------------------
# adapters on and off the shared base, the runs
# ----------------------------------------------------------------------------------------------


def strip_adapters(model: nn.Module) -> int:
    """Replace every peft LoRA layer and every GRIT layer of ``model`` by its base layer, in place.

    Also removes what attaching left behind (peft's ``peft_config``, gradient checkpointing,
    the input-grad hook), so the next method starts from the bare base. Returns the count removed.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    from fteval.grit import GritLoraLinear

    names = [n for n, m in model.named_modules() if n and isinstance(m, (BaseTunerLayer, GritLoraLinear))]
    done: list[str] = []
    for name in sorted(names, key=lambda n: n.count(".")):
        if any(name.startswith(d + ".") for d in done):
            continue  # inside an adapter layer already replaced
        layer = model.get_submodule(name)
        base = layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer.base_layer
        model.set_submodule(name, base)
        done.append(name)
    for m in model.modules():  # undo nn.Module.compile (compile_blocks)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    if hasattr(model, "peft_config"):
        del model.peft_config
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
    try:
        model.disable_input_require_grads()
    except AttributeError:  # never enabled (older transformers raise here)
        pass
    return len(done)


def restore_base(bm: BenchModel) -> None:
    """Bare base back on its device after a method (adapters off; Lightning's teardown moved it to the CPU)."""
    strip_adapters(bm.model)
    bm.model.to(bm.device)
    for p in bm.model.parameters():
        p.requires_grad_(False)
    free_memory(bm.device)


def _optimizer_factory(device: torch.device, lr: float):
    """AdamW, fused on CUDA (one kernel for all adapter tensors), PyTorch's default elsewhere."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.0, **kwargs)


def _engine(spec: RunSpec, bm: BenchModel) -> TrainingEngine:
    """The engine of a run's options; on a CPU the ``cuda_graph`` path runs without capture."""
    return TrainingEngine(compile_blocks=spec.compile_blocks, fused_loss=spec.fused_loss,
                          activation_offload=spec.activation_offload, cuda_graph=spec.cuda_graph,
                          capture=bm.device.type == "cuda")


def _plain_run(spec: RunSpec, bm: BenchModel, loader: DataLoader, clock: StepClock) -> dict:
    """The reference loop: peft + PyTorch, with the run's options from the same
    :class:`~fteval.models.engine.TrainingEngine` as fteval's module (compiled blocks, fused loss,
    offload, graphs), driven through its public methods."""
    from peft import LoraConfig, get_peft_model

    base = bm.model
    base.train()
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(DEFAULT_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    engine = _engine(spec, bm)
    engine.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer_factory(bm.device, spec.lr)(params)
    amp = bm.device.type == "cuda"
    engine.start(model, params)  # as AdapterModule(cuda_graph=True) runs its micro-batches
    in_step = engine.runs_backward_in_step
    if spec.gc_freeze:  # what callbacks.perf.GarbageCollection does for the Lightning methods
        gc.collect()
        gc.freeze()
    for batch in loader:
        batch = {k: v.to(bm.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(bm.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = engine.training_loss(model, batch)
            if not in_step:  # under cuda_graph training_loss ran backward and zeroed in place
                loss.backward()
        optimizer.step()
        if not in_step:
            optimizer.zero_grad(set_to_none=True)
        clock.mark(loss.detach())
    engine.stop()
    if spec.gc_freeze:
        gc.unfreeze()
    n_train = sum(p.numel() for p in params)
    del optimizer, params, model
    return {"trainable_params": n_train}


def _lightning_run(spec: RunSpec, bm: BenchModel, loader: DataLoader, clock: StepClock, workdir: Path) -> dict:
    """fteval's module in a Lightning Trainer, as ``fteval fit`` would run it (minus logging/checkpoints)."""
    import lightning as L

    from callbacks.kfac import KFACPreconditioner
    from callbacks.perf import GarbageCollection
    from callbacks.reprojection import NeuralReprojection
    from fteval.methods import get_method

    ClockCallback, GritCostProbe = _lightning_callbacks()
    method, entry = spec.method, get_method(spec.method)
    module = entry.module_class()(
        model_name_or_path=f"random:{bm.name}", quantization=bm.quantization, r=LORA_R, alpha=LORA_ALPHA,
        dropout=LORA_DROPOUT, target_modules=DEFAULT_TARGETS, optimizer=_optimizer_factory(bm.device, spec.lr),
        lr_schedule="constant", warmup_steps=0, gradient_checkpointing=spec.gradient_checkpointing,
        compile_blocks=spec.compile_blocks, attn_implementation=bm.attn_implementation,
        export_dir=str(workdir / f"{method}_adapter"), fused_loss=spec.fused_loss,
        activation_offload=spec.activation_offload, cuda_graph=spec.cuda_graph,
    )
    module.setup_base_model(bm.model, attn_implementation=bm.attn_implementation)
    module.engine.capture = bm.device.type == "cuda"  # on a CPU: the cuda_graph path without capture
    callbacks: list = [GarbageCollection()] if spec.gc_freeze else []  # as the training configs list it
    probe = None
    if entry.kfac_callbacks:
        kfac = KFACPreconditioner(update_freq=GRIT_UPDATE_FREQ)
        reproj = NeuralReprojection(every_n_steps=GRIT_REPROJECT_EVERY)
        probe = GritCostProbe(kfac, reproj, bm.device)
        callbacks += [kfac, reproj, probe]
    callbacks.append(ClockCallback(clock))  # last: a step's end includes the other callbacks' work
    cuda = bm.device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=[bm.device.index or 0] if cuda else 1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=spec.warmup + spec.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(workdir),
        callbacks=callbacks,
    )
    n_train = sum(p.numel() for p in module.trainable_parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(module, train_dataloaders=loader)
    extra: dict[str, Any] = {"trainable_params": n_train}
    if probe is not None:
        extra.update(probe.costs)
        extra.update(update_freq=GRIT_UPDATE_FREQ, every_n_steps=GRIT_REPROJECT_EVERY)
    module.model = None
    del trainer, module, callbacks
    return extra


def run_method(spec: RunSpec, bm: BenchModel, workdir: Path, profiler: Any = None) -> dict:
    """Run ``spec`` on the shared base and return its measurements (``error`` holds why a run failed)."""
    device = bm.device
    method, batch_size, steps, warmup = spec.method, spec.batch_size, spec.steps, spec.warmup
    dataset = SyntheticLM((warmup + steps) * batch_size, spec.seq_len, bm.config.vocab_size, seed=spec.seed,
                          min_len=spec.min_seq_len)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, pin_memory=device.type == "cuda",
                        collate_fn=dataset.collate(spec.padding_free))
    clock = StepClock(device, profiler)
    row: dict[str, Any] = {"method": method, "batch_size": batch_size, "seq_len": spec.seq_len,
                           "min_seq_len": spec.min_seq_len, "padding_free": spec.padding_free,
                           "compile_blocks": spec.compile_blocks, "gc_freeze": spec.gc_freeze,
                           "fused_loss": spec.fused_loss, "activation_offload": spec.activation_offload,
                           "cuda_graph": spec.cuda_graph,
                           "gradient_checkpointing": spec.gradient_checkpointing, "steps": steps, "warmup": warmup,
                           "tokens_per_step": dataset.real_tokens(batch_size, warmup), "error": None}
    free_memory(device)
    reset_peak_memory(device)
    torch.manual_seed(spec.seed)  # same adapter initialisation for every method
    if spec.compile_blocks:  # count only this run's graphs and breaks, whatever compiled before
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
    t0 = time.perf_counter()
    try:
        if method == PLAIN:
            row.update(_plain_run(spec, bm, loader, clock))
        else:
            row.update(_lightning_run(spec, bm, loader, clock, workdir))
    except Exception as exc:  # one failed run (often out of memory) must not lose the others
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    row["wall_s"] = time.perf_counter() - t0
    row["peak_mem_gib"] = peak_memory_gib(device)
    row["reserved_mem_gib"] = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    del loader, dataset
    t1 = time.perf_counter()
    restore_base(bm)
    if spec.compile_blocks:
        row["graph_breaks"] = int(sum(counters["graph_break"].values()))
        row["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        torch._dynamo.reset()  # every compiled run starts cold: its compile falls in its own warm-up
        counters.clear()
    row["restore_s"] = time.perf_counter() - t1
    if row["error"] is None:
        seconds = clock.step_seconds(warmup)
        if len(seconds) != steps:
            row["error"] = f"measured {len(seconds)} steps instead of {steps}"
        else:
            t = timing_summary(seconds)
            row.update({f"step_{k}": v for k, v in t.items()})
            row["step_ms_all"] = [1000.0 * s for s in seconds]
            row["tokens_per_s"] = row["tokens_per_step"] / (t["mean_ms"] / 1000.0)
            row["tokens_per_s_p50"] = row["tokens_per_step"] / (t["p50_ms"] / 1000.0)
            losses = [float(x) for x in torch.stack(clock.losses).float().cpu()] if clock.losses else []
            row["loss_first"], row["loss_last"] = (losses[0], losses[-1]) if losses else (None, None)
            if "kfac_refresh_ms" in row:  # a method with periodic work: its cost amortised per step
                row["amortised_step_ms"] = (row["step_p50_ms"] + row["kfac_refresh_ms"] / GRIT_UPDATE_FREQ
                                            + row["reprojection_ms"] / GRIT_REPROJECT_EVERY)
    return row


def longest_trainable(
    method: str, bm: BenchModel, batch_size: int, start: int, limit: int, granularity: int, workdir: Path, **kw: Any,
) -> dict:
    """Longest sequence (a multiple of ``granularity``, <= ``limit``) at which ``method`` trains one
    warm-up step and one timed step: doubling from ``start`` until a try fails, then bisection."""
    tries: list[dict] = []

    def fits(seq: int) -> bool:
        print(f"[fteval bench] longest sequence, {method}: trying {seq} tokens", flush=True)
        row = run_method(RunSpec(method, batch_size, seq, steps=1, warmup=1, **kw), bm, workdir)
        tries.append({"seq_len": seq, "ok": row["error"] is None, "peak_mem_gib": row["peak_mem_gib"],
                      "tokens_per_s": row.get("tokens_per_s"), "error": row["error"]})
        return row["error"] is None

    ok, bad, seq = 0, None, min(start, limit)
    while seq <= limit:
        if not fits(seq):
            bad = seq
            break
        ok = seq
        if seq == limit:
            break
        seq = min(seq * 2, limit)
    while bad is not None and bad - ok > granularity:
        mid = (ok + bad) // 2 // granularity * granularity
        if mid <= ok:
            break
        ok, bad = (mid, bad) if fits(mid) else (ok, mid)
    best = next((t for t in tries if t["seq_len"] == ok and t["ok"]), {})
    return {"method": method, "batch_size": batch_size, "longest_seq_len": ok, "limit": limit,
            "first_failure": bad, "peak_mem_gib": best.get("peak_mem_gib"), "tokens_per_s": best.get("tokens_per_s"),
            "tries": tries, **{k: v for k, v in kw.items() if k in ("gradient_checkpointing", "fused_loss",
                                                                      "activation_offload", "compile_blocks", "cuda_graph")}}
