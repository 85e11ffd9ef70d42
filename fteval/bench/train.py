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

Code: this file holds the command and its settings (:class:`TrainBenchSettings`, checked before
anything is built); the runs are :mod:`fteval.bench.train_runs`, the profile
:mod:`fteval.bench.train_profile`, the ratios :mod:`fteval.bench.train_ratios` and the printed tables
:mod:`fteval.bench.train_report`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from fteval.bench.common import (
    MODEL_CONFIGS,
    PEAK_FLOPS,
    BenchModel,
    bitsandbytes_available,
    build_random_model,
    default_device,
    flops_per_token,
    llama_config,
    machine_info,
    mfu,
)
from fteval.bench.train_profile import profile_method as _profile_method
from fteval.bench.train_ratios import DEFAULT_METHODS, PLAIN, TARGETS, bench_methods, comparisons, median_of_repeats
from fteval.bench.train_report import print_longest, print_result
from fteval.bench.train_runs import (
    GRIT_REPROJECT_EVERY,
    GRIT_UPDATE_FREQ,
    LEARNING_RATE,
    LORA_ALPHA,
    LORA_DROPOUT,
    LORA_R,
    RunSpec,
    longest_trainable,
    run_method,
)
from fteval.io import write_json_atomic
from fteval.methods import get_method
from fteval.models.base import DEFAULT_TARGETS

__all__ = ["TrainBenchSettings", "bench_train"]

FUSED_LOSSES = ("off", "chunked", "liger")
QUANTIZATIONS = ("nf4", "fp4", "none")


@dataclass(frozen=True)
class TrainBenchSettings:
    """The settings of one ``fteval bench train`` call (the arguments of :func:`bench_train`, same names).

    Checked when created: a bad value raises one ``ValueError`` that names the argument, the value and
    what to pass instead, before a model is built.
    """

    model_config: str = "llama3-8b"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    batch_sizes: list[int] = field(default_factory=lambda: [4])
    seq_len: int = 1024
    gradient_checkpointing: list[bool] = field(default_factory=lambda: [True, False])
    steps: int = 10
    warmup: int = 3
    quantization: str = "nf4"
    profile: bool = False
    profile_method: str = "qlora"
    profile_steps: int = 3
    peak_tflops: float = PEAK_FLOPS / 1e12
    attn_implementation: str = "sdpa"
    seed: int = 0
    min_seq_len: Optional[int] = None
    padding_free: list[bool] = field(default_factory=lambda: [False])
    repeats: int = 1
    compile_blocks: list[bool] = field(default_factory=lambda: [False])
    gc_freeze: bool = True
    fused_loss: list[str] = field(default_factory=lambda: ["off"])
    activation_offload: list[bool] = field(default_factory=lambda: [False])
    cuda_graph: list[bool] = field(default_factory=lambda: [False])
    find_max_seq_len: bool = False
    seq_len_step: int = 1024

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> Optional[str]:
        """The first bad value, as the message to raise; None when every value is usable."""
        if self.model_config not in MODEL_CONFIGS:
            return f"model_config={self.model_config!r} is not one of {list(MODEL_CONFIGS)}"
        methods = list(self.methods)
        known = bench_methods()
        if not methods or any(m not in known for m in methods):
            return f"methods={methods} must be a non-empty subset of {known}"
        full = [m for m in methods if m != PLAIN and not get_method(m).quantises_base]
        if full and self.quantization != "none":
            return (f"methods {full} train on a full-precision base, but quantization={self.quantization!r}; pass "
                    "--quantization none (every method then runs unquantised) or time them in a run of their own")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            return f"batch_sizes={list(self.batch_sizes)} must be a non-empty list of positive integers"
        for name in ("gradient_checkpointing", "padding_free", "compile_blocks", "activation_offload", "cuda_graph"):
            if not getattr(self, name):
                return f"{name} is empty; pass [false], [true] or [false, true]"
        if any(self.cuda_graph) and any(self.activation_offload):
            return "cuda_graph and activation_offload cannot both be true (offload copies on a side stream)"
        if any(self.cuda_graph) and (self.min_seq_len is not None or any(self.padding_free)):
            return ("cuda_graph replays batches of a repeated shape; leave min_seq_len unset and padding_free "
                    "[false] (ragged and padding-free batches would run eagerly)")
        if self.steps < 1:
            return f"steps={self.steps}: at least 1 timed optimizer step is needed"
        if self.warmup < 1:
            return f"warmup={self.warmup}: at least 1 untimed warm-up step is needed (its end starts the clock)"
        if self.quantization not in QUANTIZATIONS:
            return f"quantization={self.quantization!r} is not one of 'nf4', 'fp4', 'none'"
        if self.quantization != "none" and not bitsandbytes_available():
            return f"quantization={self.quantization!r} needs bitsandbytes; install it or pass quantization='none'"
        if self.profile and self.profile_method not in methods:
            return f"profile_method={self.profile_method!r} is not among methods={methods}"
        if self.min_seq_len is not None and not 1 <= self.min_seq_len <= self.seq_len:
            return (f"min_seq_len={self.min_seq_len} must lie in [1, seq_len={self.seq_len}] "
                    "(or be None: all rows seq_len)")
        if not self.fused_loss or any(f not in FUSED_LOSSES for f in self.fused_loss):
            return f"fused_loss={list(self.fused_loss)} must be a non-empty list of 'off', 'chunked', 'liger'"
        if self.profile_steps < 1:
            return f"profile_steps={self.profile_steps} must be >= 1"
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            return f"repeats={self.repeats!r} must be a positive integer"
        if self.peak_tflops <= 0:
            return f"peak_tflops={self.peak_tflops} must be > 0"
        if not 2 <= self.seq_len <= self.max_positions:
            return f"seq_len={self.seq_len} must lie in [2, {self.max_positions}] for {self.model_config}"
        if self.find_max_seq_len and self.seq_len_step < 1:
            return f"seq_len_step={self.seq_len_step} must be >= 1"
        return None

    @property
    def max_positions(self) -> int:
        """The model's longest sequence (its position embeddings)."""
        return llama_config(self.model_config).max_position_embeddings

    def variants(self, batch_size: int, gradient_checkpointing: bool) -> list[RunSpec]:
        """One run of the first method per option combination at this batch size and checkpointing."""
        return [RunSpec(self.methods[0], int(batch_size), self.seq_len, bool(gradient_checkpointing), self.steps,
                        self.warmup, seed=self.seed, min_seq_len=self.min_seq_len, padding_free=bool(pf),
                        compile_blocks=bool(comp), gc_freeze=self.gc_freeze, fused_loss=fl,
                        activation_offload=bool(off), cuda_graph=bool(cg))
                for pf in self.padding_free for comp in self.compile_blocks
                for fl in self.fused_loss for off in self.activation_offload for cg in self.cuda_graph]

    def as_json(self, device: torch.device) -> dict:
        """The ``settings`` block of the result file."""
        return {
            "model_config": self.model_config, "methods": list(self.methods), "batch_sizes": list(self.batch_sizes),
            "seq_len": self.seq_len, "gradient_checkpointing": list(self.gradient_checkpointing), "steps": self.steps,
            "warmup": self.warmup, "quantization": self.quantization, "seed": self.seed,
            "min_seq_len": self.min_seq_len, "padding_free": list(self.padding_free),
            "compile_blocks": list(self.compile_blocks), "fused_loss": list(self.fused_loss),
            "activation_offload": list(self.activation_offload), "cuda_graph": list(self.cuda_graph),
            "gc_freeze": self.gc_freeze,
            "repeats": self.repeats,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": LORA_DROPOUT, "target_modules": list(DEFAULT_TARGETS)},
            "learning_rate": LEARNING_RATE,
            "precision": "bf16 autocast (Lightning bf16-mixed)" if device.type == "cuda" else "fp32",
            "kfac_callbacks": {"update_freq": GRIT_UPDATE_FREQ, "every_n_steps": GRIT_REPROJECT_EVERY},
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        }


def _find_longest(settings: TrainBenchSettings, bm: BenchModel, workdir: Path, output: Path) -> int:
    """Per method, the longest sequence that trains at the first batch size and option values."""
    granularity = min(settings.seq_len_step, max(2, settings.max_positions // 8))
    longest = [longest_trainable(
        method, bm, int(settings.batch_sizes[0]), settings.seq_len, settings.max_positions, granularity, workdir,
        gradient_checkpointing=bool(settings.gradient_checkpointing[0]), compile_blocks=bool(settings.compile_blocks[0]),
        gc_freeze=settings.gc_freeze, fused_loss=settings.fused_loss[0],
        activation_offload=bool(settings.activation_offload[0]), cuda_graph=bool(settings.cuda_graph[0]))
        for method in settings.methods]
    write_json_atomic(output, {"benchmark": "train-longest-sequence", "machine": machine_info(),
                               "model_config": settings.model_config, "quantization": settings.quantization,
                               "results": longest}, canonical=True)
    print_longest(longest, output)
    return 0


def _time_runs(settings: TrainBenchSettings, bm: BenchModel, workdir: Path, output: Path) -> int:
    """Every method at every setting (repeated, order rotated), the ratios, the optional profile; the result file."""
    methods, repeats = list(settings.methods), settings.repeats
    cfg = bm.config
    attn_width = cfg.num_attention_heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    flops = flops_per_token(bm.n_params, cfg.num_hidden_layers, attn_width, settings.seq_len)
    peak = settings.peak_tflops * 1e12
    runs: list[dict] = []
    for b in settings.batch_sizes:
        for ckpt in settings.gradient_checkpointing:
            for first in settings.variants(b, ckpt):
                if settings.min_seq_len is not None:
                    # Ragged batches: every batch has a new shape, and the first run to see a shape pays
                    # for it (cuDNN attention plans, allocator growth): one untimed pass of the first
                    # method over the same batches, so every timed method finds them warm.
                    print(f"[fteval bench] shape warm-up: {methods[0]}, untimed", flush=True)
                    run_method(first, bm, workdir)
                group: dict[str, list[dict]] = {m: [] for m in methods}
                for rep in range(repeats):
                    # interleaved, the order rotated every repeat (plain, qlora, grit; qlora, grit, plain; ...)
                    # so that no method always runs last, when the shared host has drifted furthest
                    shift = rep % len(methods)
                    for method in methods[shift:] + methods[:shift]:
                        spec = replace(first, method=method)
                        lengths = f"{spec.seq_len}" if spec.min_seq_len is None else f"{spec.min_seq_len}-{spec.seq_len}"
                        again = f", repeat {rep + 1}/{repeats}" if repeats > 1 else ""
                        print(f"[fteval bench] {method}: batch {b} x {lengths} tokens, checkpointing {ckpt}, "
                              f"padding-free {spec.padding_free}, compiled {spec.compile_blocks}, fused loss "
                              f"{spec.fused_loss}, offload {spec.activation_offload}, CUDA graph {spec.cuda_graph}{again}", flush=True)
                        row = run_method(spec, bm, workdir)
                        row["repeat"] = rep
                        if row["error"] is None:
                            row["mfu"] = mfu(row["tokens_per_s"], flops["total"], peak)
                        group[method].append(row)
                for method in methods:
                    runs.append(median_of_repeats(group[method]))
    prof = None
    if settings.profile:
        prof = _profile_method(RunSpec(
            settings.profile_method, int(settings.batch_sizes[0]), settings.seq_len,
            bool(settings.gradient_checkpointing[0]), settings.profile_steps, settings.warmup, seed=settings.seed,
            compile_blocks=bool(settings.compile_blocks[0]), gc_freeze=settings.gc_freeze), bm, workdir)
    result = {
        "benchmark": "train",
        "machine": machine_info(),
        "settings": settings.as_json(bm.device),
        "model": bm.describe(),
        "flops_per_token": flops,
        "peak_flops": peak,
        "flops_formula": "4 N + 6 L T d (frozen base; causal attention; see fteval.bench.common.flops_per_token)",
        "targets": TARGETS,
        "runs": runs,
        "comparisons": comparisons(runs),
        "profile": prof,
    }
    write_json_atomic(output, result, canonical=True)
    print_result(result, bm.device, settings.peak_tflops, output)
    return 1 if any(r["error"] for r in runs) or (prof and prof.get("error")) else 0


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
    cuda_graph: list[bool] = [False],  # noqa: B006
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
        methods: 'plain' (a minimal peft + PyTorch loop) and any method of fteval.methods ('qlora', 'grit',
            'qdora', 'lora', ...); 'lora' trains on a full-precision base and needs quantization 'none'.
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
        peak_tflops: accelerator peak for MFU, TFLOP/s (790 = the H200 reference of BENCHMARKS.md).
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
        cuda_graph: one run per value: eager steps (False) or each micro-batch's forward and
            backward replayed from a CUDA graph (True, ``model.cuda_graph`` of ``fteval fit``,
            :mod:`fteval.models.cuda_graph`; the plain loop the same way). The first two steps
            run eagerly and the third captures: keep ``warmup`` >= 3. CUDA only; on a CPU the
            runs take the same path without capture.
        find_max_seq_len: instead of timing, find for every method the longest sequence (a
            multiple of 1024, up to the model's positions) that trains at the first batch size,
            checkpointing, fused-loss and offload value: a doubling search then a bisection, one
            warm-up + one step per try; prints a table of the longest sequence per method.
        seq_len_step: the resolution of that search (tokens); a coarser step needs fewer tries.

    Returns 0 when every run finished, 1 when any failed (its row holds the error).
    """
    settings = TrainBenchSettings(
        model_config=model_config, methods=list(methods), batch_sizes=list(batch_sizes), seq_len=seq_len,
        gradient_checkpointing=list(gradient_checkpointing), steps=steps, warmup=warmup, quantization=quantization,
        profile=profile, profile_method=profile_method, profile_steps=profile_steps, peak_tflops=peak_tflops,
        attn_implementation=attn_implementation, seed=seed, min_seq_len=min_seq_len, padding_free=list(padding_free),
        repeats=repeats, compile_blocks=list(compile_blocks), gc_freeze=gc_freeze, fused_loss=list(fused_loss),
        activation_offload=list(activation_offload), cuda_graph=list(cuda_graph), find_max_seq_len=find_max_seq_len, seq_len_step=seq_len_step)
    device = default_device()
    bm = build_random_model(model_config, quantization=quantization, device=device, seed=seed,
                            attn_implementation=attn_implementation)
    with tempfile.TemporaryDirectory(prefix="fteval-bench-") as tmp:
        if find_max_seq_len:
            return _find_longest(settings, bm, Path(tmp), Path(output))
        return _time_runs(settings, bm, Path(tmp), Path(output))
