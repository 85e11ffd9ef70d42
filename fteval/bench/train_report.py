"""What ``fteval bench train`` prints: the runs, the ratios, the profile and the longest-sequence search."""

from __future__ import annotations

from pathlib import Path

import torch

from fteval.bench.common import format_table

__all__ = ["LONGEST_COLUMNS", "RATIO_COLUMNS", "RUN_COLUMNS", "print_longest", "print_result"]

RUN_COLUMNS = (
    ("method", "method", ""), ("batch_size", "batch", "d"), ("gradient_checkpointing", "ckpt", ""),
    ("padding_free", "padding-free", ""), ("compile_blocks", "compiled", ""), ("fused_loss", "fused loss", ""),
    ("activation_offload", "offload", ""), ("cuda_graph", "CUDA graph", ""), ("tokens_per_step", "tokens/step", ",.0f"), ("tokens_per_s", "tokens/s", ",.0f"), ("step_mean_ms", "step ms mean", ".1f"), ("step_p50_ms", "p50", ".1f"),
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
    ("cuda_graph", "CUDA graph", ""), ("plain_cuda_graph_speedup", "plain graph/eager", ".3f"),
    ("qlora_cuda_graph_speedup", "qlora graph/eager", ".3f"), ("grit_cuda_graph_speedup", "grit graph/eager", ".3f"),
)
LONGEST_COLUMNS = (
    ("method", "method", ""), ("batch_size", "batch", "d"), ("longest_seq_len", "longest sequence", ",d"),
    ("first_failure", "first failure", ""), ("peak_mem_gib", "peak GiB", ".1f"), ("tokens_per_s", "tokens/s", ",.0f"),
    ("fused_loss", "fused loss", ""), ("activation_offload", "offload", ""),
)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def print_result(result: dict, device: torch.device, peak_tflops: float, output: Path) -> None:
    """The timed runs, the ratios and (when profiled) the top kernels of a ``train`` benchmark result."""
    settings, model, flops = result["settings"], result["model"], result["flops_per_token"]
    runs, comparisons, prof = result["runs"], result["comparisons"], result["profile"]
    print()
    print(f"model {settings['model_config']} ({model['n_params'] / 1e9:.3g}B params, {settings['quantization']}, "
          f"{model['attn_implementation']}) on {_device_name(device)}; {flops['total'] / 1e9:.2f} GFLOP/token; "
          f"MFU vs {peak_tflops:g} TFLOP/s")
    print(format_table(runs, RUN_COLUMNS))
    print()
    print(format_table(comparisons, RATIO_COLUMNS))
    shown = {c[0] for c in RATIO_COLUMNS}
    extra = sorted({k for row in comparisons for k, v in row.items() if "_vs_" in k and k not in shown
                    and isinstance(v, float)})
    if extra:  # the pairs of the other methods (qdora, lora, ...)
        print()
        print(format_table(comparisons, (("batch_size", "batch", "d"), ("gradient_checkpointing", "ckpt", ""),
                                         *((k, k.replace("_vs_", "/"), ".3f") for k in extra))))
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


def print_longest(longest: list[dict], output: Path) -> None:
    """The longest trainable sequence per method."""
    print(format_table(longest, LONGEST_COLUMNS))
    print(f"\nwritten {output}")
