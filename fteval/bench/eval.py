"""``fteval bench eval``: the evaluation side's speed: AQI statistics and hidden-state extraction.

1. AQI metrics and the paired bootstrap on synthetic embeddings (``n_prompts`` x ``embed_dim``,
   half safe, half unsafe, a baseline and a "tuned" matrix): the metric and resampling functions of
   :mod:`fteval.eval.metrics`, :mod:`fteval.eval.bootstrap` and :mod:`fteval.eval.stats`, timed one by
   one, on CPU tensors and, when a GPU is present, on CUDA tensors (the statistics code runs on either
   device; the evaluator currently hands it CPU tensors). Each stage runs once untimed (cold: imports,
   CUDA context), then ``repeats`` times; the median is reported.
   ``aqi_plus_bootstrap_s`` = ``cluster_scores`` of both models + ``paired_bootstrap_deltas``
   (the "AQI metrics + 1000-resample bootstrap" stage; its target: < 5 s on the GPU);
   ``evaluator_stats_s`` adds per-model ``bootstrap_cis`` and silhouettes with their jackknife
   (``silhouette_fit``, scikit-learn distances, CPU only). The evaluator's own intervals are closed-form
   (:mod:`fteval.eval.separation`: one pass over the embeddings and an [N, N] Gram matrix per
   model) and draw no resamples.
2. Hidden-state extraction: the evaluator's test step (forward with ``output_hidden_states``,
   then :func:`fteval.eval.pooling.pool_layers`) over ``n_extract`` prompts, prompts/s. The
   embedded model (or any model name :func:`fteval.models.loading.load_causal_lm` accepts) reads
   real chat-formatted prompts of the bundled ACCD sample; a random-weight architecture
   (``llama3-8b``, ``smollm2-135m``, ``tiny``) reads random token ids of ``extract_prompt_tokens``
   each (the 826 bundled ACCD prompts, chat-formatted for SmolLM2-135M-Instruct, hold 35-94
   tokens, mean 48: the default 64 is of that order).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fteval.bench.common import (
    MODEL_CONFIGS,
    build_random_model,
    default_device,
    format_table,
    free_memory,
    machine_info,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)
from fteval.eval.headtohead import SUMMARY_METRICS  # the scores fteval test gives intervals

__all__ = ["bench_eval", "synthetic_embeddings"]

AQI_TARGET_S = 5.0  # the stage's target: AQI metrics + bootstrap within this many seconds on the GPU


def synthetic_embeddings(n_prompts: int, embed_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base ``[N, D]``, tuned ``[N, D]``, labels ``[N]``) float32 / int64; first half safe (0), rest unsafe (1).

    Gaussian clouds; the unsafe class is shifted along one random unit direction, by 0.5 in the
    base and 1.0 in the tuned matrix (per-coordinate noise 1), so both are separable and differ.
    """
    gen = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n_prompts) >= n_prompts // 2).long()
    direction = torch.randn(embed_dim, generator=gen)
    direction = direction / direction.norm()
    noise = torch.randn(n_prompts, embed_dim, generator=gen)
    base = noise + 0.5 * labels[:, None].float() * direction
    tuned = noise + 0.3 * torch.randn(n_prompts, embed_dim, generator=gen) + 1.0 * labels[:, None].float() * direction
    return base, tuned, labels


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Cold run, then ``repeats`` timed runs (device-synchronised); seconds."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    cold = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"cold_s": cold, "median_s": statistics.median(times), "min_s": min(times)}


def _stats_bench(base, tuned, labels, n_resamples: int, device: torch.device, repeats: int, seed: int) -> dict:
    from fteval.eval.metrics import cluster_scores
    from fteval.eval.bootstrap import bootstrap_cis, paired_bootstrap_deltas
    from fteval.eval.stats import silhouette_fit

    b, t, y = base.to(device), tuned.to(device), labels.to(device)
    stages = {
        "cluster_scores_x2": lambda: (cluster_scores(b, y), cluster_scores(t, y)),
        "paired_bootstrap": lambda: paired_bootstrap_deltas(b, t, y, n_resamples, seed, metrics=SUMMARY_METRICS),
        "bootstrap_cis_x2": lambda: (bootstrap_cis(b, y, n_resamples, seed, metrics=SUMMARY_METRICS),
                                     bootstrap_cis(t, y, n_resamples, seed, metrics=SUMMARY_METRICS)),
    }
    if device.type == "cpu":  # scikit-learn: CPU only
        stages["silhouette_x2"] = lambda: (silhouette_fit(b, y), silhouette_fit(t, y))
    out: dict[str, Any] = {"device": str(device)}
    for name, fn in stages.items():
        out[name] = _timed(fn, device, repeats)
    out["aqi_plus_bootstrap_s"] = out["cluster_scores_x2"]["median_s"] + out["paired_bootstrap"]["median_s"]
    out["evaluator_stats_s"] = sum(v["median_s"] for k, v in out.items() if isinstance(v, dict))
    check = paired_bootstrap_deltas(b, t, y, n_resamples, seed, metrics=("aqi",))["aqi"]
    out["check_delta_aqi"] = check.delta  # same on every device (float64); guards against a silent no-op
    return out


def _extraction_batches(extraction_model: str, tokenizer, n: int, batch_size: int, prompt_tokens: int, vocab: int,
                        seed: int) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches ``{"input_ids", "attention_mask"}`` ``[batch, seq]`` as the evaluator's loader gives them."""
    from fteval.data.formatting import format_prompt, pad_batch

    feats: list[dict] = []
    if tokenizer is not None:
        from fteval.data.sources import load_records

        rows = load_records("sample", "accd", limit=n)
        while len(rows) < n:  # more prompts than the sample holds: cycle it
            rows = rows + rows[: n - len(rows)]
        for row in rows[:n]:
            text = format_prompt(tokenizer, row["input"])
            feats.append({"input_ids": tokenizer(text, add_special_tokens=False)["input_ids"]})
        pad_id = tokenizer.pad_token_id
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(vocab, (n, prompt_tokens), generator=gen)
        feats = [{"input_ids": row.tolist()} for row in ids]
        pad_id = 0
    return [pad_batch(feats[i : i + batch_size], pad_id, "right") for i in range(0, n, batch_size)]


def _extraction_bench(extraction_model: str, n_extract: int, batch_size: int, prompt_tokens: int,
                      quantization: str, seed: int) -> dict:
    from fteval.eval.pooling import pool_layers

    device = default_device()
    t0 = time.perf_counter()
    if extraction_model in MODEL_CONFIGS:
        bm = build_random_model(extraction_model, quantization=quantization, device=device, seed=seed)
        model, tokenizer, vocab, attn, dtype = bm.model, None, bm.config.vocab_size, bm.attn_implementation, bm.dtype
    else:
        from fteval.models.loading import load_causal_lm

        loaded = load_causal_lm(extraction_model, quantization=quantization, device=device)
        model, tokenizer, attn = loaded.model, loaded.tokenizer, loaded.attn_implementation
        if quantization == "none":  # 4-bit models are placed (and quantised) on the device by the loader
            model.to(device)
        vocab, dtype = model.config.vocab_size, next(model.parameters()).dtype
    load_s = time.perf_counter() - t0
    model.eval()
    model.config.use_cache = False
    batches = _extraction_batches(extraction_model, tokenizer, n_extract, batch_size, prompt_tokens, vocab, seed)

    def run(batch_list) -> torch.Tensor:
        reps = []
        with torch.inference_mode():
            for batch in batch_list:
                ids = batch["input_ids"].to(device, non_blocking=True)
                mask = batch["attention_mask"].to(device, non_blocking=True)
                out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                reps.append(pool_layers(out.hidden_states, mask, sink="first"))  # [B, L+1, D]
        return torch.cat(reps).cpu()  # [N, L+1, D]

    run(batches[:1])  # warm-up (kernels, allocator); untimed
    free_memory(device)
    reset_peak_memory(device)
    synchronize(device)
    t0 = time.perf_counter()
    reps = run(batches)
    synchronize(device)
    seconds = time.perf_counter() - t0
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    result = {
        "model": extraction_model,
        "random_weights": extraction_model in MODEL_CONFIGS,
        "quantization": quantization,
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "attn_implementation": attn,
        "load_s": load_s,
        "n_prompts": n_extract,
        "batch_size": batch_size,
        "mean_prompt_tokens": tokens / n_extract,
        "padded_tokens": int(sum(b["attention_mask"].numel() for b in batches)),
        "seconds": seconds,
        "prompts_per_s": n_extract / seconds,
        "tokens_per_s": tokens / seconds,
        "peak_mem_gib": peak_memory_gib(device),
        "representations_shape": list(reps.shape),
        "representations_finite": bool(torch.isfinite(reps).all()),
    }
    del model, reps
    free_memory(device)
    return result


def bench_eval(
    embed_dim: int = 4096,
    n_prompts: int = 1000,
    n_resamples: int = 1000,
    extraction_model: str = "embedded",
    n_extract: int = 64,
    extract_batch_size: int = 16,
    extract_prompt_tokens: int = 64,
    extract_quantization: str = "none",
    repeats: int = 3,
    output: Path = Path("output/m05_inference_backends/eval_bench.json"),
    seed: int = 0,
) -> int:
    """Evaluation speed: AQI metrics + paired bootstrap (CPU and GPU), hidden-state extraction prompts/s.

    Args:
        embed_dim: width D of the synthetic embeddings (4096 = Llama-3-8B's hidden size).
        n_prompts: synthetic prompts N (half safe, half unsafe).
        n_resamples: bootstrap resamples.
        extraction_model: 'embedded' (SmolLM2-135M-Instruct), a local folder or hub id, a
            random-weight architecture ('llama3-8b', 'smollm2-135m', 'tiny'), or 'none' to skip.
        n_extract: prompts to extract hidden states for.
        extract_batch_size: prompts per forward pass.
        extract_prompt_tokens: tokens per prompt for random-weight architectures (random ids).
        extract_quantization: 'none' (the evaluator's default: bf16 on GPU, fp32 on CPU), 'nf4' or 'fp4'.
        repeats: timed repetitions of each statistics stage (median reported).
        output: JSON file.
        seed: data seed.

    Returns 0 (1 if the GPU statistics stage or the extraction failed; the JSON says why).
    """
    for label, value, low in (("embed_dim", embed_dim, 1), ("n_prompts", n_prompts, 4), ("n_resamples", n_resamples, 1),
                              ("n_extract", n_extract, 1), ("extract_batch_size", extract_batch_size, 1),
                              ("extract_prompt_tokens", extract_prompt_tokens, 2), ("repeats", repeats, 1)):
        if int(value) < low:
            raise ValueError(f"{label}={value} must be >= {low}")
    if extract_quantization not in ("none", "nf4", "fp4"):
        raise ValueError(f"extract_quantization={extract_quantization!r} is not one of 'none', 'nf4', 'fp4'")
    if not extraction_model or not str(extraction_model).strip():
        raise ValueError("extraction_model is empty; use 'embedded', a model folder, 'llama3-8b', 'tiny' or 'none'")

    base, tuned, labels = synthetic_embeddings(n_prompts, embed_dim, seed)
    devices = [torch.device("cpu")] + ([default_device()] if torch.cuda.is_available() else [])
    stats_rows, failed = [], False
    for device in devices:
        print(f"[fteval bench] AQI statistics on {device}: {n_prompts} x {embed_dim}, {n_resamples} resamples", flush=True)
        try:
            stats_rows.append(_stats_bench(base, tuned, labels, n_resamples, device, repeats, seed))
        except Exception as exc:  # record a GPU failure, keep the CPU numbers
            if device.type == "cpu":
                raise
            failed = True
            stats_rows.append({"device": str(device), "error": f"{type(exc).__name__}: {exc}"[:300]})
    extraction: Optional[dict] = None
    if extraction_model != "none":
        print(f"[fteval bench] hidden-state extraction with {extraction_model}: {n_extract} prompts", flush=True)
        try:
            extraction = _extraction_bench(extraction_model, n_extract, extract_batch_size, extract_prompt_tokens,
                                           extract_quantization, seed)
        except (ValueError, FileNotFoundError):
            raise
        except Exception as exc:
            from fteval.models.loading import ModelLoadError

            if isinstance(exc, ModelLoadError):
                raise
            failed = True
            extraction = {"model": extraction_model, "error": f"{type(exc).__name__}: {exc}"[:300]}
    gpu = next((r for r in stats_rows if r["device"].startswith("cuda") and "error" not in r), None)
    result = {
        "benchmark": "eval",
        "machine": machine_info(),
        "settings": {"embed_dim": embed_dim, "n_prompts": n_prompts, "n_resamples": n_resamples, "repeats": repeats,
                     "seed": seed, "metrics_bootstrapped": list(SUMMARY_METRICS)},
        "statistics": stats_rows,
        "aqi_target_s": AQI_TARGET_S,
        "aqi_target_met_gpu": (gpu["aqi_plus_bootstrap_s"] < AQI_TARGET_S) if gpu else None,
        "extraction": extraction,
    }
    from fteval.io import write_json_atomic

    write_json_atomic(Path(output), result, canonical=True)
    table = []
    for r in stats_rows:
        row = {"device": r["device"], "error": r.get("error")}
        for k in ("cluster_scores_x2", "paired_bootstrap", "bootstrap_cis_x2", "silhouette_x2"):
            row[k] = r[k]["median_s"] if k in r else None
        row.update(aqi=r.get("aqi_plus_bootstrap_s"), total=r.get("evaluator_stats_s"))
        table.append(row)
    print()
    print(format_table(table, (("device", "device", ""), ("cluster_scores_x2", "metrics x2 s", ".3f"),
                               ("paired_bootstrap", "paired bootstrap s", ".3f"), ("aqi", "AQI+bootstrap s", ".3f"),
                               ("bootstrap_cis_x2", "CIs x2 s", ".3f"), ("silhouette_x2", "silhouette x2 s", ".3f"),
                               ("total", "evaluator stats s", ".3f"), ("error", "error", ""))))
    if extraction is not None:
        print()
        print(format_table([extraction], (("model", "extraction model", ""), ("device", "device", ""),
                                          ("dtype", "dtype", ""), ("batch_size", "batch", "d"),
                                          ("mean_prompt_tokens", "tokens/prompt", ".1f"),
                                          ("prompts_per_s", "prompts/s", ",.1f"), ("tokens_per_s", "tokens/s", ",.0f"),
                                          ("peak_mem_gib", "peak GiB", ".2f"), ("error", "error", ""))))
    print(f"\nwritten {output}")
    return 1 if failed else 0
