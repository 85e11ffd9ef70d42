"""``fteval bench train``: training throughput of fteval's QLoRA and GRIT against a plain PyTorch + peft loop.

Method (BENCHMARKS.md has the commands and the tables):

* One random-weight base model (:func:`fteval.bench.common.build_random_model`: the architecture
  from its config, bf16 on a GPU, linear layers quantised to nf4) is built once; every method
  runs on that same object, in the same process, on the same synthetic batches (random token ids,
  every token real and in the loss). Adapters are attached fresh for each method and removed
  afterwards; memory is freed and the peak counter reset between methods.
* ``plain``: the minimal loop a user would write: ``get_peft_model`` (LoRA r 16, alpha 32,
  dropout 0.05 on the 7 projections, fp32 adapters), bf16 autocast on the GPU, AdamW (fused on
  CUDA), ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
* ``qlora`` / ``grit``: fteval's :class:`~fteval.models.QLoRAModule` / :class:`~fteval.models.GRITModule`
  in a Lightning ``Trainer`` (``bf16-mixed`` on the GPU, no logger, checkpointing or progress
  bar), the same optimiser and LoRA settings; GRIT with its K-FAC and reprojection callbacks at
  the spec's frequencies (refresh every 20 optimizer steps, reprojection every 40).
* Step time: wall time between the ends of consecutive optimizer steps, each end marked after
  ``torch.cuda.synchronize()``; so it covers everything a step costs (batch transfer, forward,
  backward, optimizer, hooks and callbacks). The first ``warmup`` steps are not timed.
  tokens/s = batch x sequence / mean step time. Peak memory = ``torch.cuda.max_memory_allocated``
  over the run (model included). MFU: :func:`fteval.bench.common.flops_per_token`.
* GRIT's periodic work rarely falls into a short window (the K-FAC refresh at steps 0 and 1,
  while statistics first fill, then every 20; reprojection at step 40). It is timed separately
  at the end of the run (on the GPU, before Lightning's teardown): one forced refresh of every
  factor and one reprojection of every layer, and added amortised:
  ``amortised_step_ms = p50 + refresh_ms / 20 + reprojection_ms / 40``.

Lightning's teardown moves the model to the CPU after ``fit``; the shared base is moved back
before the next method (not timed).
"""

from __future__ import annotations

import gc
import logging
import statistics
import tempfile
import time
import traceback
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fteval.bench.common import (
    MODEL_CONFIGS,
    PEAK_FLOPS,
    BenchModel,
    bitsandbytes_available,
    build_random_model,
    default_device,
    flops_per_token,
    format_table,
    free_memory,
    machine_info,
    mfu,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
    timing_summary,
)
from fteval.io import write_json_atomic
from fteval.models.base import DEFAULT_TARGETS
from fteval.models.base import compile_blocks as _compile_blocks
from fteval.models.fused_loss import fused_causal_lm_loss
from fteval.models.offload import offload_activations

log = logging.getLogger(__name__)

__all__ = ["METHODS", "SyntheticLM", "bench_train", "strip_adapters"]

METHODS = ("plain", "qlora", "grit")
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 32.0, 0.05  # QLoRAModule's defaults, used by every method
GRIT_UPDATE_FREQ = 20  # spec: K-FAC inverse refresh every 20 optimizer steps
GRIT_REPROJECT_EVERY = 40  # spec: reprojection every 40 optimizer steps
LEARNING_RATE = 1e-4
TARGETS = {"qlora_vs_plain_max": 1.03, "grit_vs_qlora_max": 1.10, "mfu_goal_b4_no_ckpt": 0.5}


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


class _StepClock:
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
        def __init__(self, clock: _StepClock) -> None:
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
# adapters on and off the shared base
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


def _optimizer_factory(device: torch.device, lr: float):
    """AdamW, fused on CUDA (one kernel for all adapter tensors), PyTorch's default elsewhere."""
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.0, **kwargs)


def _plain_run(
    bm: BenchModel, loader: DataLoader, clock: _StepClock, gradient_checkpointing: bool, lr: float,
    compile_blocks: bool = False, gc_freeze: bool = False, fused_loss: str = "off", activation_offload: bool = False,
) -> dict:
    """The reference loop: peft + PyTorch, nothing else (``compile_blocks``: the blocks compiled as fteval's are)."""
    from peft import LoraConfig, get_peft_model

    base = bm.model
    base.train()
    config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=list(DEFAULT_TARGETS),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if compile_blocks:
        _compile_blocks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer_factory(bm.device, lr)(params)
    amp = bm.device.type == "cuda"
    if gc_freeze:  # what callbacks.perf.GarbageCollection does for the Lightning methods
        gc.collect()
        gc.freeze()
    for batch in loader:
        batch = {k: v.to(bm.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.autocast(bm.device.type, dtype=torch.bfloat16, enabled=amp), offload_activations(activation_offload):
            if fused_loss == "off":
                loss = model(**batch).loss
            else:
                loss = fused_causal_lm_loss(model, batch, fused_loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark(loss)
    if gc_freeze:
        gc.unfreeze()
    n_train = sum(p.numel() for p in params)
    del optimizer, params, model
    return {"trainable_params": n_train}


def _lightning_run(
    method: str, bm: BenchModel, loader: DataLoader, clock: _StepClock, gradient_checkpointing: bool, lr: float,
    max_steps: int, workdir: Path, compile_blocks: bool = False, gc_freeze: bool = False, fused_loss: str = "off",
    activation_offload: bool = False,
) -> dict:
    """fteval's module in a Lightning Trainer, as ``fteval fit`` would run it (minus logging/checkpoints)."""
    import lightning as L

    from callbacks.kfac import KFACPreconditioner
    from callbacks.perf import GarbageCollection
    from callbacks.reprojection import NeuralReprojection
    from fteval.models.grit import GRITModule
    from fteval.models.qlora import QLoRAModule

    ClockCallback, GritCostProbe = _lightning_callbacks()
    cls = QLoRAModule if method == "qlora" else GRITModule
    module = cls(
        model_name_or_path=f"random:{bm.name}", quantization=bm.quantization, r=LORA_R, alpha=LORA_ALPHA,
        dropout=LORA_DROPOUT, target_modules=DEFAULT_TARGETS, optimizer=_optimizer_factory(bm.device, lr),
        lr_schedule="constant", warmup_steps=0, gradient_checkpointing=gradient_checkpointing,
        compile_blocks=compile_blocks, attn_implementation=bm.attn_implementation, export_dir=str(workdir / f"{method}_adapter"),
        fused_loss=fused_loss, activation_offload=activation_offload,
    )
    module.setup_base_model(bm.model, attn_implementation=bm.attn_implementation)
    callbacks: list = [GarbageCollection()] if gc_freeze else []  # as the training configs list it
    probe = None
    if method == "grit":
        kfac = KFACPreconditioner(update_freq=GRIT_UPDATE_FREQ)  # must precede NeuralReprojection
        reproj = NeuralReprojection(every_n_steps=GRIT_REPROJECT_EVERY)
        probe = GritCostProbe(kfac, reproj, bm.device)
        callbacks += [kfac, reproj, probe]
    callbacks.append(ClockCallback(clock))  # last: a step's end includes the other callbacks' work
    cuda = bm.device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=[bm.device.index or 0] if cuda else 1,
        precision="bf16-mixed" if cuda else "32-true",
        max_steps=max_steps,
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


def _restore_base(bm: BenchModel) -> None:
    """Bare base back on its device after a method (adapters off; Lightning's teardown moved it to the CPU)."""
    strip_adapters(bm.model)
    bm.model.to(bm.device)
    for p in bm.model.parameters():
        p.requires_grad_(False)
    free_memory(bm.device)


def _run_method(
    method: str, bm: BenchModel, batch_size: int, seq_len: int, gradient_checkpointing: bool, steps: int,
    warmup: int, seed: int, lr: float, workdir: Path, profiler: Any = None, min_seq_len: Optional[int] = None,
    padding_free: bool = False, compile_blocks: bool = False, gc_freeze: bool = False, fused_loss: str = "off",
    activation_offload: bool = False,
) -> dict:
    """Run one method for warmup + steps optimizer steps; return its measurements."""
    device = bm.device
    dataset = SyntheticLM((warmup + steps) * batch_size, seq_len, bm.config.vocab_size, seed=seed, min_len=min_seq_len)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, pin_memory=device.type == "cuda",
                        collate_fn=dataset.collate(padding_free))
    clock = _StepClock(device, profiler)
    row: dict[str, Any] = {"method": method, "batch_size": batch_size, "seq_len": seq_len,
                           "min_seq_len": min_seq_len, "padding_free": padding_free, "compile_blocks": compile_blocks,
                           "gc_freeze": gc_freeze, "fused_loss": fused_loss, "activation_offload": activation_offload,
                           "gradient_checkpointing": gradient_checkpointing, "steps": steps, "warmup": warmup,
                           "tokens_per_step": dataset.real_tokens(batch_size, warmup), "error": None}
    free_memory(device)
    reset_peak_memory(device)
    torch.manual_seed(seed)  # same adapter initialisation for every method
    t0 = time.perf_counter()
    try:
        if method == "plain":
            row.update(_plain_run(bm, loader, clock, gradient_checkpointing, lr, compile_blocks, gc_freeze,
                                  fused_loss, activation_offload))
        else:
            row.update(_lightning_run(method, bm, loader, clock, gradient_checkpointing, lr, warmup + steps, workdir,
                                      compile_blocks, gc_freeze, fused_loss, activation_offload))
    except Exception as exc:  # one failed run (often out of memory) must not lose the others
        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    row["wall_s"] = time.perf_counter() - t0
    row["peak_mem_gib"] = peak_memory_gib(device)
    row["reserved_mem_gib"] = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    del loader, dataset
    t1 = time.perf_counter()
    _restore_base(bm)
    if compile_blocks:
        from torch._dynamo.utils import counters

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
            if method == "grit" and "kfac_refresh_ms" in row:
                row["amortised_step_ms"] = (row["step_p50_ms"] + row["kfac_refresh_ms"] / GRIT_UPDATE_FREQ
                                            + row["reprojection_ms"] / GRIT_REPROJECT_EVERY)
    return row


# ----------------------------------------------------------------------------------------------
# profiling
# ----------------------------------------------------------------------------------------------

_CATEGORIES = (  # substring of a kernel/op name (lower case) -> category; first match wins (heuristic)
    ("4-bit dequantise", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_fused")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "mm", "matmul", "linear")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("cross-entropy/softmax", ("softmax", "nll", "cross_entropy", "log_softmax")),
    ("copy/cast", ("copy", "cast", "to_copy", "memcpy", "memset", "fill")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (elementwise, norms, ...)"


def _top_ops(prof, active_steps: int, device: torch.device, top: int = 20) -> dict:
    """Top ``top`` kernels/ops by self CUDA time or self CPU time, and time per category."""
    on_device = device.type == "cuda"

    def self_us(ev) -> float:
        if on_device:
            v = getattr(ev, "self_device_time_total", None)
            return float(v if v is not None else getattr(ev, "self_cuda_time_total", 0.0))
        return float(ev.self_cpu_time_total)

    events = [ev for ev in prof.key_averages() if self_us(ev) > 0]
    if on_device:  # kernels only: their self CUDA time is the GPU's busy time
        # (not user annotations such as Lightning's "Optimizer.step#AdamW.step" range, which the profiler
        # also places on the GPU timeline, spanning the whole step)
        kernels = [ev for ev in events if getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type)
                   and not getattr(ev, "is_user_annotation", False)]
        events = kernels or events
    total = sum(self_us(ev) for ev in events) or 1.0
    events.sort(key=self_us, reverse=True)
    rows = [{
        "name": ev.key[:120],
        "calls": int(ev.count),
        "self_ms_per_step": self_us(ev) / 1000.0 / active_steps,
        "percent": 100.0 * self_us(ev) / total,
        "category": _category(ev.key),
    } for ev in events[:top]]
    cats: dict[str, float] = {}
    for ev in events:
        cats[_category(ev.key)] = cats.get(_category(ev.key), 0.0) + self_us(ev)
    out = {
        "sort_by": "self device (CUDA kernel) time" if on_device else "self CPU time",
        "total_ms_per_step": total / 1000.0 / active_steps,
        "top": rows,
        "categories_ms_per_step": {k: v / 1000.0 / active_steps for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
    }
    if on_device:
        # Host side of the same steps: at launch-bound shapes the step is the host's time, not the GPU's.
        host = [ev for ev in prof.key_averages()
                if ev.self_cpu_time_total > 0 and "CUDA" not in str(getattr(ev, "device_type", ""))]
        host.sort(key=lambda ev: ev.self_cpu_time_total, reverse=True)
        out["kernels_per_step"] = sum(int(ev.count) for ev in events) / active_steps
        out["host_top"] = [{
            "name": ev.key[:120],
            "calls": int(ev.count),
            "self_cpu_ms_per_step": ev.self_cpu_time_total / 1000.0 / active_steps,
        } for ev in host[:top]]
    return out


def _profile_method(
    method: str, bm: BenchModel, batch_size: int, seq_len: int, gradient_checkpointing: bool, warmup: int,
    active: int, seed: int, lr: float, workdir: Path, compile_blocks: bool = False, gc_freeze: bool = False,
) -> dict:
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bm.device.type == "cuda" else [])
    sched = schedule(wait=max(warmup - 1, 0), warmup=1, active=active, repeat=1)
    with profile(activities=activities, schedule=sched) as prof:
        row = _run_method(method, bm, batch_size, seq_len, gradient_checkpointing, active, warmup, seed, lr, workdir,
                          profiler=prof, compile_blocks=compile_blocks, gc_freeze=gc_freeze)
    if row["error"]:
        return {"method": method, "error": row["error"]}
    out = {"method": method, "batch_size": batch_size, "seq_len": seq_len,
           "gradient_checkpointing": gradient_checkpointing, "steps_profiled": active,
           "step_p50_ms_under_profiler": row["step_p50_ms"]}
    out.update(_top_ops(prof, active, bm.device))
    return out


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def _median_of_repeats(rows: list[dict]) -> dict:
    """One row per method from its repeats: the repeat with the median mean step time (lower
    median for an even count), with all repeats' means and p50s attached. Failed repeats are
    skipped; if all failed, the first failure is returned."""
    ok = [r for r in rows if r["error"] is None]
    if not ok:
        return rows[0]
    if len(rows) == 1:
        return rows[0]
    ranked = sorted(ok, key=lambda r: r["step_mean_ms"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["repeats"] = len(rows)
    # per repeat, in repeat order (None for a failed repeat), so repeats of different methods pair up
    chosen["repeat_step_mean_ms"] = [r.get("step_mean_ms") if r["error"] is None else None for r in rows]
    chosen["repeat_step_p50_ms"] = [r.get("step_p50_ms") if r["error"] is None else None for r in rows]
    if any("amortised_step_ms" in r for r in ok):
        chosen["repeat_amortised_step_ms"] = [r.get("amortised_step_ms") if r["error"] is None else None for r in rows]
    chosen["repeat_errors"] = [r["error"] for r in rows if r["error"] is not None]
    return chosen


def _paired_ratios(num: list, den: list) -> list[float]:
    """Per-repeat ratios of two methods' values (repeats whose runs both succeeded)."""
    return [a / b for a, b in zip(num, den) if a is not None and b]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b not in (None, 0) else None


def _comparisons(runs: list[dict]) -> list[dict]:
    """Per (batch, checkpointing): qlora vs plain and grit vs qlora (step time, throughput, memory)."""
    out = []
    def key(r: dict) -> tuple:
        return (r["batch_size"], r["gradient_checkpointing"], bool(r.get("padding_free", False)),
                bool(r.get("compile_blocks", False)), r.get("fused_loss", "off"), bool(r.get("activation_offload", False)))

    keys = sorted({key(r) for r in runs}, key=lambda k: (k[0], not k[1], k[2], k[3], k[4], k[5]))
    for b, ckpt, pf, comp, fl, off in keys:
        by = {r["method"]: r for r in runs if key(r) == (b, ckpt, pf, comp, fl, off) and not r["error"]}
        row: dict[str, Any] = {"batch_size": b, "gradient_checkpointing": ckpt, "padding_free": pf,
                               "compile_blocks": comp, "fused_loss": fl, "activation_offload": off}
        plain_loss = {r["method"]: r for r in runs if key(r) == (b, ckpt, pf, comp, "off", False) and not r["error"]}
        if fl != "off" or off:  # what the memory techniques bought each method: memory and speed ratios
            for m, r in by.items():
                if m in plain_loss:
                    row[f"{m}_memory_vs_default"] = _ratio(r["peak_mem_gib"], plain_loss[m]["peak_mem_gib"])
                    row[f"{m}_speed_vs_default"] = _ratio(r["tokens_per_s"], plain_loss[m]["tokens_per_s"])
        padded = {r["method"]: r for r in runs if key(r) == (b, ckpt, False, comp, fl, off) and not r["error"]}
        if pf:  # what flattening bought each method over its padded batches
            for m, r in by.items():
                if m in padded:
                    row[f"{m}_padding_free_speedup"] = _ratio(r["tokens_per_s"], padded[m]["tokens_per_s"])
        eager = {r["method"]: r for r in runs if key(r) == (b, ckpt, pf, False, fl, off) and not r["error"]}
        if comp:  # what compiling the blocks bought each method, and fteval compiled against the eager plain loop
            for m, r in by.items():
                if m in eager:
                    row[f"{m}_compile_speedup"] = _ratio(r["tokens_per_s"], eager[m]["tokens_per_s"])
            if "qlora" in by and "plain" in eager:
                row["qlora_compiled_vs_plain_eager_step_mean"] = _ratio(by["qlora"]["step_mean_ms"],
                                                                        eager["plain"]["step_mean_ms"])
        for num, den in (("qlora", "plain"), ("grit", "qlora"), ("grit", "plain")):
            if num in by and den in by:
                n, d = by[num], by[den]
                row[f"{num}_vs_{den}_step_mean"] = _ratio(n["step_mean_ms"], d["step_mean_ms"])
                row[f"{num}_vs_{den}_step_p50"] = _ratio(n["step_p50_ms"], d["step_p50_ms"])
                row[f"{num}_vs_{den}_tokens_per_s"] = _ratio(n["tokens_per_s"], d["tokens_per_s"])
                row[f"{num}_vs_{den}_peak_mem"] = _ratio(n["peak_mem_gib"], d["peak_mem_gib"])
        if "grit" in by and "qlora" in by and by["grit"].get("amortised_step_ms") is not None:
            row["grit_vs_qlora_amortised"] = _ratio(by["grit"]["amortised_step_ms"], by["qlora"]["step_p50_ms"])
        # With repeats: the ratio within each repeat (its methods ran back to back, in rotated order), then
        # the median over repeats. A shared host drifts by tens of percent over minutes; pairing cancels the
        # drift that comparing each method's median run (above) keeps.
        pairs = (("qlora_vs_plain", "qlora", "repeat_step_mean_ms", "plain", "repeat_step_mean_ms"),
                 ("grit_vs_qlora", "grit", "repeat_step_mean_ms", "qlora", "repeat_step_mean_ms"),
                 ("grit_vs_qlora_amortised", "grit", "repeat_amortised_step_ms", "qlora", "repeat_step_p50_ms"))
        for name, num, nkey, den, dkey in pairs:
            if num in by and den in by and by[num].get(nkey) and by[den].get(dkey):
                ratios = _paired_ratios(by[num][nkey], by[den][dkey])
                if ratios:
                    row[f"{name}_paired"] = ratios
                    row[f"{name}_paired_median"] = statistics.median(ratios)
        qlora_ratio = row.get("qlora_vs_plain_paired_median", row.get("qlora_vs_plain_step_mean"))
        if qlora_ratio is not None:
            row["qlora_target_met"] = qlora_ratio <= TARGETS["qlora_vs_plain_max"]
        grit_ratio = row.get("grit_vs_qlora_amortised_paired_median",
                             row.get("grit_vs_qlora_amortised", row.get("grit_vs_qlora_step_mean")))
        if grit_ratio is not None:
            row["grit_target_met"] = grit_ratio <= TARGETS["grit_vs_qlora_max"]
        out.append(row)
    return out


RUN_COLUMNS = (
    ("method", "method", ""), ("batch_size", "batch", "d"), ("gradient_checkpointing", "ckpt", ""),
    ("padding_free", "padding-free", ""), ("compile_blocks", "compiled", ""), ("fused_loss", "fused loss", ""),
    ("activation_offload", "offload", ""), ("tokens_per_step", "tokens/step", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_mean_ms", "step ms mean", ".1f"), ("step_p50_ms", "p50", ".1f"),
    ("peak_mem_gib", "peak GiB", ".1f"), ("mfu", "MFU", ".3f"), ("amortised_step_ms", "GRIT amortised ms", ".1f"),
    ("error", "error", ""),
)
RATIO_COLUMNS = (
    ("batch_size", "batch", "d"), ("gradient_checkpointing", "ckpt", ""),
    ("qlora_vs_plain_step_mean", "qlora/plain step", ".3f"), ("qlora_target_met", "<=1.03", ""),
    ("grit_vs_qlora_step_mean", "grit/qlora step", ".3f"), ("grit_vs_qlora_amortised", "grit/qlora amortised", ".3f"),
    ("grit_target_met", "<=1.10", ""),
    ("qlora_vs_plain_paired_median", "qlora/plain paired", ".3f"),
    ("grit_vs_qlora_amortised_paired_median", "grit/qlora amortised paired", ".3f"),
    ("qlora_vs_plain_peak_mem", "qlora/plain mem", ".3f"),
    ("grit_vs_qlora_peak_mem", "grit/qlora mem", ".3f"), ("padding_free", "padding-free", ""),
    ("plain_padding_free_speedup", "plain pf/padded", ".3f"), ("qlora_padding_free_speedup", "qlora pf/padded", ".3f"),
    ("grit_padding_free_speedup", "grit pf/padded", ".3f"), ("compile_blocks", "compiled", ""),
    ("plain_compile_speedup", "plain compiled/eager", ".3f"), ("qlora_compile_speedup", "qlora compiled/eager", ".3f"),
    ("grit_compile_speedup", "grit compiled/eager", ".3f"),
    ("qlora_compiled_vs_plain_eager_step_mean", "qlora compiled/plain eager step", ".3f"),
    ("fused_loss", "fused loss", ""), ("activation_offload", "offload", ""),
    ("qlora_memory_vs_default", "qlora mem/default", ".3f"), ("qlora_speed_vs_default", "qlora speed/default", ".3f"),
    ("grit_memory_vs_default", "grit mem/default", ".3f"), ("grit_speed_vs_default", "grit speed/default", ".3f"),
)


def _longest_trainable(
    method: str, bm: BenchModel, batch_size: int, start: int, limit: int, granularity: int, workdir: Path, **kw: Any,
) -> dict:
    """Longest sequence (a multiple of ``granularity``, <= ``limit``) at which ``method`` trains one
    warm-up step and one timed step: doubling from ``start`` until a try fails, then bisection."""
    tries: list[dict] = []

    def fits(seq: int) -> bool:
        print(f"[fteval bench] longest sequence, {method}: trying {seq} tokens", flush=True)
        row = _run_method(method, bm, batch_size, seq, steps=1, warmup=1, seed=0, lr=LEARNING_RATE, workdir=workdir, **kw)
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
                                                                      "activation_offload", "compile_blocks")}}


def bench_train(
    model_config: str = "llama3-8b",
    methods: list[str] = ["plain", "qlora", "grit"],  # noqa: B006 - jsonargparse shows the default
    batch_sizes: list[int] = [4],  # noqa: B006
    seq_len: int = 1024,
    gradient_checkpointing: list[bool] = [True, False],  # noqa: B006
    steps: int = 10,
    warmup: int = 3,
    quantization: str = "nf4",
    output: Path = Path("output/m05_inference_backends/train_bench.json"),
    profile: bool = False,
    profile_method: str = "qlora",
    profile_steps: int = 3,
    peak_tflops: float = PEAK_FLOPS / 1e12,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    min_seq_len: Optional[int] = None,
    padding_free: list[bool] = [False],  # noqa: B006
    repeats: int = 1,
    compile_blocks: list[bool] = [False],  # noqa: B006
    gc_freeze: bool = True,
    fused_loss: list[str] = ["off"],  # noqa: B006
    activation_offload: list[bool] = [False],  # noqa: B006
    find_max_seq_len: bool = False,
    seq_len_step: int = 1024,
) -> int:
    """Training throughput of fteval QLoRA and GRIT against a plain PyTorch + peft loop, in one process.

    Every method runs on the same random-weight base model (built from ``model_config``, nf4
    linear layers), the same synthetic batches and the same LoRA settings (r 16, alpha 32, the
    7 projections); see BENCHMARKS.md for the method. Prints a table and writes JSON.

    Args:
        model_config: 'llama3-8b' (Meta-Llama-3-8B's architecture, 8.03B parameters; GPU),
            'smollm2-135m', 'tiny' (2 layers, hidden 64; CPU tests) or 'tiny-deep' (32 such layers: on a CPU
            a stand-in for host-bound GPU shapes, where per-layer Python overhead decides the step).
        methods: any of 'plain', 'qlora', 'grit'.
        batch_sizes: sequences per optimizer step, one run per value.
        seq_len: tokens per sequence.
        gradient_checkpointing: one run per value (non-reentrant checkpointing on / off).
        steps: timed optimizer steps per run.
        warmup: untimed optimizer steps before them (>= 1; GRIT's first K-FAC refreshes fall here).
        quantization: 'nf4', 'fp4' or 'none' (base in bf16 on GPU / fp32 on CPU).
        output: JSON file with machine, settings, every run and the ratios.
        profile: after the timed runs, profile ``profile_method`` on the first batch size,
            checkpointing and ``compile_blocks`` value with torch.profiler; the JSON and the console get the top-20
            kernels by CUDA time, or CPU ops by CPU time on a CPU.
        profile_method: the method to profile.
        profile_steps: optimizer steps recorded by the profiler.
        peak_tflops: accelerator peak for MFU, TFLOP/s (790 = the issue's H200 reference).
        attn_implementation: 'sdpa' (PyTorch's fused attention, as the reference loop), 'flash_attention_2'
            (needs flash-attn), 'eager' or 'auto'.
        seed: data and adapter-initialisation seed.
        min_seq_len: draw each row's length uniformly from [min_seq_len, seq_len] (real data is
            ragged) instead of every row having seq_len tokens; tokens/s then counts real tokens.
        padding_free: one run per value: batches padded to their longest row (False) or
            flattened into one row without padding (True, ``data.padding_free`` of ``fteval fit``).
            With equal lengths there is no padding to remove. With ragged lengths each
            (batch, checkpointing, padding-free) group starts with one untimed pass of the first
            method over the same batches (shape warm-up).
        repeats: run every method this many times, interleaved with the order rotated each
            repeat (plain, qlora, grit; qlora, grit, plain; ...), and report per method the run
            with the median mean step time, with every repeat's mean and p50 listed
            (``repeat_step_mean_ms``/``repeat_step_p50_ms``), plus the ratios within each repeat
            and their median (``*_paired``, ``*_paired_median``; the targets are judged on these).
            Host-bound rows (batch 1 with checkpointing) vary by tens of percent between runs on
            a shared host; one run is not enough to compare them.
        compile_blocks: one run per value: transformer blocks eager (False) or ``torch.compile``d
            (True, ``model.compile_blocks`` of ``fteval fit``; the plain loop's blocks are compiled
            the same way). Every compiled run starts cold (``torch._dynamo.reset``), so its compile
            falls in its warm-up steps: keep ``warmup`` >= 2 (a backward recompile can follow the first step).
        gc_freeze: every method runs with Python's garbage collector frozen after set-up
            (``callbacks.perf.GarbageCollection``, in the training configs; the plain loop calls
            ``gc.freeze()`` itself). Without it a full collection (hundreds of ms) lands in some
            runs' timed windows and not in others'.
        fused_loss: one run per value: 'off' (the full logits, as transformers computes the loss),
            'chunked' (:mod:`fteval.models.fused_loss`; the plain loop uses it too) or 'liger'.
        activation_offload: one run per value (:mod:`fteval.models.offload`; the plain loop too).
        find_max_seq_len: instead of timing, find for every method the longest sequence (a
            multiple of 1024, up to the model's positions) that trains at the first batch size,
            checkpointing, fused-loss and offload value: a doubling search then a bisection, one
            warm-up + one step per try; prints a table of the longest sequence per method.
        seq_len_step: the resolution of that search (tokens); a coarser step needs fewer tries.

    Returns 0 when every run finished, 1 when any failed (its row holds the error).
    """
    if model_config not in MODEL_CONFIGS:
        raise ValueError(f"model_config={model_config!r} is not one of {list(MODEL_CONFIGS)}")
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"methods={methods} must be a non-empty subset of {list(METHODS)}")
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes={list(batch_sizes)} must be a non-empty list of positive integers")
    if not gradient_checkpointing:
        raise ValueError("gradient_checkpointing is empty; pass [true], [false] or [true, false]")
    if steps < 1:
        raise ValueError(f"steps={steps}: at least 1 timed optimizer step is needed")
    if warmup < 1:
        raise ValueError(f"warmup={warmup}: at least 1 untimed warm-up step is needed (its end starts the clock)")
    if quantization not in ("nf4", "fp4", "none"):
        raise ValueError(f"quantization={quantization!r} is not one of 'nf4', 'fp4', 'none'")
    if quantization != "none" and not bitsandbytes_available():
        raise ValueError(f"quantization={quantization!r} needs bitsandbytes; install it or pass quantization='none'")
    if profile and profile_method not in methods:
        raise ValueError(f"profile_method={profile_method!r} is not among methods={methods}")
    if min_seq_len is not None and not 1 <= min_seq_len <= seq_len:
        raise ValueError(f"min_seq_len={min_seq_len} must lie in [1, seq_len={seq_len}] (or be None: all rows seq_len)")
    if not padding_free:
        raise ValueError("padding_free is empty; pass [false], [true] or [false, true]")
    if not compile_blocks:
        raise ValueError("compile_blocks is empty; pass [false], [true] or [false, true]")
    if not fused_loss or any(f not in ("off", "chunked", "liger") for f in fused_loss):
        raise ValueError(f"fused_loss={list(fused_loss)} must be a non-empty list of 'off', 'chunked', 'liger'")
    if not activation_offload:
        raise ValueError("activation_offload is empty; pass [false], [true] or [false, true]")
    if profile_steps < 1:
        raise ValueError(f"profile_steps={profile_steps} must be >= 1")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} must be a positive integer")
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops={peak_tflops} must be > 0")
    from fteval.bench.common import llama_config

    max_pos = llama_config(model_config).max_position_embeddings
    if not 2 <= seq_len <= max_pos:
        raise ValueError(f"seq_len={seq_len} must lie in [2, {max_pos}] for {model_config}")

    device = default_device()
    bm = build_random_model(model_config, quantization=quantization, device=device, seed=seed,
                            attn_implementation=attn_implementation)
    if find_max_seq_len:
        if seq_len_step < 1:
            raise ValueError(f"seq_len_step={seq_len_step} must be >= 1")
        granularity = min(seq_len_step, max(2, max_pos // 8))
        longest = []
        with tempfile.TemporaryDirectory(prefix="fteval-bench-") as tmp:
            for method in methods:
                longest.append(_longest_trainable(
                    method, bm, int(batch_sizes[0]), seq_len, max_pos, granularity, Path(tmp),
                    gradient_checkpointing=bool(gradient_checkpointing[0]), compile_blocks=bool(compile_blocks[0]),
                    gc_freeze=gc_freeze, fused_loss=fused_loss[0], activation_offload=bool(activation_offload[0])))
        write_json_atomic(Path(output), {"benchmark": "train-longest-sequence", "machine": machine_info(),
                                         "model_config": model_config, "quantization": quantization, "results": longest},
                          canonical=True)
        print(format_table(longest, (("method", "method", ""), ("batch_size", "batch", "d"),
                                     ("longest_seq_len", "longest sequence", ",d"), ("first_failure", "first failure", ""),
                                     ("peak_mem_gib", "peak GiB", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                                     ("fused_loss", "fused loss", ""), ("activation_offload", "offload", ""))))
        print(f"\nwritten {output}")
        return 0
    cfg = bm.config
    attn_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops = flops_per_token(bm.n_params, cfg.num_hidden_layers, attn_width, seq_len)
    peak = peak_tflops * 1e12
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="fteval-bench-") as tmp:
        for b in batch_sizes:
            for ckpt in gradient_checkpointing:
                variants = [(pf, comp, fl, off) for pf in padding_free for comp in compile_blocks
                            for fl in fused_loss for off in activation_offload]
                for pf, comp, fl, off in variants:
                    if min_seq_len is not None:
                        # Ragged batches: every batch has a new shape, and the first run to see a shape pays
                        # for it (cuDNN attention plans, allocator growth): one untimed pass of the first
                        # method over the same batches, so every timed method finds them warm.
                        print(f"[fteval bench] shape warm-up: {methods[0]}, untimed", flush=True)
                        _run_method(methods[0], bm, int(b), seq_len, bool(ckpt), steps, warmup, seed, LEARNING_RATE,
                                    Path(tmp), min_seq_len=min_seq_len, padding_free=bool(pf), compile_blocks=bool(comp),
                                    gc_freeze=gc_freeze, fused_loss=fl, activation_offload=bool(off))
                    group: dict[str, list[dict]] = {m: [] for m in methods}
                    for rep in range(repeats):
                        # interleaved, the order rotated every repeat (plain, qlora, grit; qlora, grit, plain; ...)
                        # so that no method always runs last, when the shared host has drifted furthest
                        shift = rep % len(methods)
                        for method in methods[shift:] + methods[:shift]:
                            lengths = f"{seq_len}" if min_seq_len is None else f"{min_seq_len}-{seq_len}"
                            again = f", repeat {rep + 1}/{repeats}" if repeats > 1 else ""
                            print(f"[fteval bench] {method}: batch {b} x {lengths} tokens, checkpointing {ckpt}, "
                                  f"padding-free {pf}, compiled {comp}, fused loss {fl}, offload {off}{again}", flush=True)
                            row = _run_method(method, bm, int(b), seq_len, bool(ckpt), steps, warmup, seed,
                                              LEARNING_RATE, Path(tmp), min_seq_len=min_seq_len, padding_free=bool(pf),
                                              compile_blocks=bool(comp), gc_freeze=gc_freeze, fused_loss=fl,
                                              activation_offload=bool(off))
                            row["repeat"] = rep
                            if row["error"] is None:
                                row["mfu"] = mfu(row["tokens_per_s"], flops["total"], peak)
                            group[method].append(row)
                    for method in methods:
                        runs.append(_median_of_repeats(group[method]))
        prof = None
        if profile:
            prof = _profile_method(profile_method, bm, int(batch_sizes[0]), seq_len, bool(gradient_checkpointing[0]),
                                   warmup, profile_steps, seed, LEARNING_RATE, Path(tmp),
                                   compile_blocks=bool(compile_blocks[0]), gc_freeze=gc_freeze)
    comparisons = _comparisons(runs)
    result = {
        "benchmark": "train",
        "machine": machine_info(),
        "settings": {
            "model_config": model_config, "methods": methods, "batch_sizes": list(batch_sizes), "seq_len": seq_len,
            "gradient_checkpointing": list(gradient_checkpointing), "steps": steps, "warmup": warmup,
            "quantization": quantization, "seed": seed, "min_seq_len": min_seq_len, "padding_free": list(padding_free),
            "compile_blocks": list(compile_blocks), "fused_loss": list(fused_loss),
            "activation_offload": list(activation_offload), "gc_freeze": gc_freeze, "repeats": repeats, "lora": {"r": LORA_R, "alpha": LORA_ALPHA,
            "dropout": LORA_DROPOUT, "target_modules": list(DEFAULT_TARGETS)}, "learning_rate": LEARNING_RATE,
            "precision": "bf16 autocast (Lightning bf16-mixed)" if device.type == "cuda" else "fp32",
            "grit": {"update_freq": GRIT_UPDATE_FREQ, "every_n_steps": GRIT_REPROJECT_EVERY},
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "model": bm.describe(),
        "flops_per_token": flops,
        "peak_flops": peak,
        "flops_formula": "4 N + 6 L T d (frozen base; causal attention; see fteval.bench.common.flops_per_token)",
        "targets": TARGETS,
        "runs": runs,
        "comparisons": comparisons,
        "profile": prof,
    }
    write_json_atomic(Path(output), result, canonical=True)
    print()
    print(f"model {model_config} ({bm.n_params / 1e9:.3g}B params, {quantization}, {bm.attn_implementation}) on "
          f"{_device_name(device)}; {flops['total'] / 1e9:.2f} GFLOP/token; MFU vs {peak_tflops:g} TFLOP/s")
    print(format_table(runs, RUN_COLUMNS))
    print()
    print(format_table(comparisons, RATIO_COLUMNS))
    if prof and not prof.get("error"):
        print()
        print(f"profile of {prof['method']} ({prof['sort_by']}, per step; total {prof['total_ms_per_step']:.1f} ms):")
        print(format_table(prof["top"], (("name", "kernel / op", ""), ("calls", "calls", "d"),
                                         ("self_ms_per_step", "ms/step", ".2f"), ("percent", "%", ".1f"),
                                         ("category", "category", ""))))
        if prof.get("host_top"):
            print(f"\nhost side of the same steps ({prof['kernels_per_step']:.0f} kernels per step; self CPU time):")
            print(format_table(prof["host_top"], (("name", "op", ""), ("calls", "calls", "d"),
                                                  ("self_cpu_ms_per_step", "ms/step", ".2f"))))
    print(f"\nwritten {output}")
    return 1 if any(r["error"] for r in runs) or (prof and prof.get("error")) else 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
