"""What the benchmarks share: random-weight models built from a config, the FLOP/MFU formula,
timing and memory helpers, machine description, tables.

Random weights: speed and memory of a training or forward step do not depend on the weight
values, so the benchmarks build the model from its architecture config (no download, no
disk) and, for QLoRA, quantise its linear layers to 4 bit the way transformers' bitsandbytes
integration does when it loads a checkpoint: every ``nn.Linear`` except ``lm_head`` becomes a
``bitsandbytes.nn.Linear4bit`` whose ``Params4bit`` is quantised when it is placed on the device.
transformers' own ``replace_with_bnb_linear`` is not used: it creates empty (meta) layers that
only a checkpoint loader fills, which a random-weight model does not have.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_CONFIGS",
    "PEAK_FLOPS",
    "BenchModel",
    "build_random_model",
    "flops_per_token",
    "format_table",
    "free_memory",
    "llama_config",
    "machine_info",
    "mfu",
    "peak_memory_gib",
    "quantize_linear_layers",
    "reset_peak_memory",
    "synchronize",
    "timing_summary",
]

#: Peak dense bf16 tensor throughput the H200 reference table of BENCHMARKS.md divides by (FLOP/s).
PEAK_FLOPS = 790e12

#: Names accepted by ``model_config`` (architecture hyper-parameters written out below).
MODEL_CONFIGS = ("llama3-8b", "llama3.1-8b", "smollm2-135m", "tiny", "tiny-deep")

_ARCHITECTURES: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B config.json: 8,030,261,248 parameters.
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
    ),
    # HuggingFaceTB/SmolLM2-135M config.json: 134,515,008 parameters (tied embeddings).
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, hidden_act="silu",
    ),
    # A 2-layer Llama for CPU tests and CI: 139,584 parameters.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, hidden_act="silu",
    ),
}
# meta-llama/Llama-3.1-8B config.json: the same weights' shapes, 131,072 positions with Llama-3 RoPE scaling.
_ARCHITECTURES["llama3.1-8b"] = dict(
    _ARCHITECTURES["llama3-8b"], max_position_embeddings=131072,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
)
# Llama-3-8B's layer count (32 blocks x 7 projections = 224 adapted layers) at the tiny width: on a CPU
# the step is then host time (Python, dispatch) rather than arithmetic, a stand-in for the GPU's
# launch-bound shapes (batch 1 with checkpointing) when comparing fteval's per-layer overhead.
_ARCHITECTURES["tiny-deep"] = dict(_ARCHITECTURES["tiny"], num_hidden_layers=32)


def llama_config(name: str):
    """transformers ``LlamaConfig`` of one of :data:`MODEL_CONFIGS`."""
    from transformers import LlamaConfig

    if name not in _ARCHITECTURES:
        raise ValueError(
            f"model_config={name!r} is not one of {list(MODEL_CONFIGS)}; use 'llama3-8b' on a GPU, "
            "'smollm2-135m' or 'tiny' on a CPU"
        )
    return LlamaConfig(**_ARCHITECTURES[name])


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


# ----------------------------------------------------------------------------------------------
# random-weight models
# ----------------------------------------------------------------------------------------------


@dataclass
class BenchModel:
    """A random-weight causal LM and what the benchmark needs to know about it."""

    model: nn.Module
    config: Any  # LlamaConfig
    name: str
    n_params: int  # parameters of the unquantised model (the FLOP count's N)
    quantization: str  # 'none', 'nf4', 'fp4'
    quantized_layers: int
    dtype: torch.dtype  # of the non-quantised weights and the 4-bit compute dtype
    device: torch.device
    attn_implementation: str
    build_s: float

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "model_config": self.name,
            "n_params": self.n_params,
            "quantization": self.quantization,
            "quantized_layers": self.quantized_layers,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "attn_implementation": self.attn_implementation,
            "build_s": round(self.build_s, 2),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "vocab_size": cfg.vocab_size,
        }


def quantize_linear_layers(
    model: nn.Module, quant_type: str, compute_dtype: torch.dtype, device: torch.device, skip: Sequence[str] = ("lm_head",)
) -> int:
    """Replace every ``nn.Linear`` (not subclasses, not names ending in ``skip``) by a 4-bit bnb ``Linear4bit``.

    Double quantisation and blocksize 64 as in :func:`fteval.models.loading.bnb_config`. The
    weight is quantised on ``device`` one layer at a time (the full-precision copy of a layer is
    freed as soon as its 4-bit copy exists). Also sets ``model.is_loaded_in_4bit`` as transformers
    does after a 4-bit load, so peft builds its 4-bit LoRA layers. Returns the number replaced.
    """
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.endswith(tuple(skip))]
    for name in names:
        old = model.get_submodule(name)
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=compute_dtype, compress_statistics=True, quant_type=quant_type)
        weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                   quant_type=quant_type, module=new)
        new.weight = weight.to(device)  # quantises: [out, in] -> packed uint8 [out * in / 2, 1] + quant_state
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data.to(device), requires_grad=False)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        del old, weight
    model.is_loaded_in_4bit = True
    if device.type == "cpu":
        from fteval.models.loading import disable_cpu_inference_repacking

        disable_cpu_inference_repacking(model)  # keeps the CPU training path correct (docs/architecture.md)
    return len(names)


def build_random_model(
    name: str,
    quantization: str = "nf4",
    device: Optional[torch.device | str] = None,
    dtype: Optional[torch.dtype] = None,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> BenchModel:
    """Build ``name``'s architecture with random weights directly on ``device``, optionally 4-bit.

    Args:
        name: one of :data:`MODEL_CONFIGS`.
        quantization: 'nf4' / 'fp4' (bitsandbytes 4-bit linear layers, lm_head kept) or 'none'.
        device: default the current CUDA device, else CPU.
        dtype: weights (and 4-bit compute dtype); default bf16 on CUDA, fp32 on CPU.
        attn_implementation: 'sdpa' (PyTorch's fused attention), 'eager' or 'flash_attention_2'.
        seed: weight initialisation seed.

    Memory: the bf16 model is built first (Llama-3-8B: 16 GB), then quantised layer by layer.
    """
    from transformers import AutoModelForCausalLM

    from fteval.models.loading import select_attn_implementation

    if quantization not in ("none", "nf4", "fp4"):
        raise ValueError(f"quantization={quantization!r} is not one of 'nf4', 'fp4', 'none'")
    if quantization != "none" and not bitsandbytes_available():
        raise ValueError(
            f"quantization={quantization!r} needs bitsandbytes, which is not installed; `pip install bitsandbytes` "
            "or use quantization='none'"
        )
    config = llama_config(name)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = select_attn_implementation(attn_implementation)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    n_params = sum(p.numel() for p in model.parameters())
    n_quant = 0
    if quantization != "none":
        n_quant = quantize_linear_layers(model, quantization, dtype, device)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    synchronize(device)
    build_s = time.perf_counter() - t0
    log.info("built random %s (%d params, %s, %d 4-bit layers) on %s in %.1f s", name, n_params, quantization,
             n_quant, device, build_s)
    return BenchModel(model=model, config=config, name=name, n_params=n_params, quantization=quantization,
                      quantized_layers=n_quant, dtype=dtype, device=device, attn_implementation=attn, build_s=build_s)


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU
# ----------------------------------------------------------------------------------------------


def flops_per_token(n_params: int, num_layers: int, attn_width: int, seq_len: int) -> dict[str, float]:
    """Model FLOPs per trained token for LoRA on a frozen base (the convention of the issue's table).

    * dense = 4 N: forward 2 N (one multiply-add per parameter) plus backward 2 N for the
      activation gradients only; a frozen base computes no weight gradients (full fine-tuning
      would add another 2 N: the usual 6 N). N counts every parameter of the unquantised base,
      as the issue does (8.03e9 for Llama-3-8B, including the 0.53e9 input embedding, which
      costs no FLOPs: this overstates dense FLOPs by ~6.5% there).
    * attention = 6 L T d: per layer and token, Q K^T and P V take 2 T_ctx d each in the forward,
      with the causal mask's average context T_ctx = T / 2 (so 2 T d), and the backward
      (dQ, dK, dV through both products) twice that; d = heads x head_dim, T = sequence length.
    * LoRA adapters (Llama-3-8B, r = 16: 6 x 41.9e6 = 0.25e9, under 1%) and gradient-checkpointing
      recomputation are not counted (model FLOPs, not hardware FLOPs).

    Returns ``{"dense": 4 N, "attention": 6 L T d, "total": sum}`` in FLOPs per token.
    """
    if n_params <= 0 or num_layers <= 0 or attn_width <= 0 or seq_len <= 0:
        raise ValueError(
            f"flops_per_token needs positive sizes, got n_params={n_params}, num_layers={num_layers}, "
            f"attn_width={attn_width}, seq_len={seq_len}"
        )
    dense = 4.0 * n_params
    attention = 6.0 * num_layers * seq_len * attn_width
    return {"dense": dense, "attention": attention, "total": dense + attention}


def mfu(tokens_per_s: float, flops_per_token_total: float, peak_flops: float = PEAK_FLOPS) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs/token / peak FLOP/s (dimensionless)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0 (FLOP/s)")
    return tokens_per_s * flops_per_token_total / peak_flops


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work on ``device`` (no-op on CPU), so a host clock reads finished work."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timing_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``{mean_ms, p50_ms, min_ms, max_ms, std_ms}`` of per-step wall times given in seconds."""
    if not seconds:
        raise ValueError("timing_summary needs at least one measured step")
    ms = [1000.0 * s for s in seconds]
    return {
        "mean_ms": statistics.fmean(ms),
        "p50_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
    }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> Optional[float]:
    """``torch.cuda.max_memory_allocated`` since the last reset, GiB; None on CPU (no per-run peak there)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next run starts from the same state."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# machine and tables
# ----------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """Host, packages and devices (the environment manifest of ``fteval env``, without token fields)."""
    from fteval.envinfo import collect_manifest, git_commit

    manifest = collect_manifest()
    for key in ("hf_token_present", "hf_token_source", "python_executable"):
        manifest.pop(key, None)
    manifest["packages"] = {k: v for k, v in manifest["packages"].items() if v is not None}
    manifest["git_commit"] = git_commit()
    manifest["torch_threads"] = torch.get_num_threads()
    return manifest


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table; ``columns`` = (key, header, format spec), missing or None values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            v = row.get(key)
            if v is None or (isinstance(v, float) and math.isnan(v)):
                line.append("-")
            else:
                line.append(format(v, spec) if spec else str(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
