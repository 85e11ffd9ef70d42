"""``fteval bench generation`` (m05): the generation backends on the same prompts, side by side, per variant.

Variants are the baseline and each adapter: on hf the PEFT folder, on llamacpp its LoRA GGUF
(``fteval export``) on the base GGUF, on openai a served model name. Each backend is built (load
time recorded), each variant warmed up with one request, then asked for the same ``n_prompts``
bundled ACCD prompts (the first rows of ``accd_sample.jsonl``, balanced safe/unsafe) with greedy
decoding and the same ``max_new_tokens``. Reported per backend and variant:

* ``tokens_per_s``: all completion tokens / wall time of the whole run (throughput);
* ``latency_p50_s`` / ``latency_p95_s``: per-prompt latency percentiles (for the batched hf
  backend a prompt's latency is its batch's time, so they are batch latencies);
* ``memory_gib`` and how it was measured (CUDA peak allocated, or process RSS: the in-process
  backends share one process, so RSS includes what earlier backends left loaded);
* ``load_s`` (building the backend, plus loading the variant where that happens on first use: a
  llama.cpp variant maps its GGUF and LoRA), prompt and completion token totals;
* ``requests_per_s`` with ``clients`` requests in flight (the openai backend's ``concurrency``; hf
  batches ``batch_size`` prompts; llama-cpp-python in process answers one at a time);
* ``agreement_with_hf``: whether the greedy answers agree with the hf backend's answers of the same
  variant on their first 32 tokens (:func:`first_tokens_agreement`).

A backend whose package is missing (or, for ``openai``, whose server is unreachable or not
given) is skipped with its reason printed and recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from fteval.backends import BACKENDS, BackendConnectionError, BackendTimeoutError, BackendUnavailableError, create_backend
from fteval.backends.base import BASELINE, GENERATION_UNITS, generation_metrics

__all__ = ["bench_generation", "bench_prompts", "first_tokens_agreement"]



def bench_prompts(n: int) -> list[str]:
    """The first ``n`` prompts (``input``) of the bundled ACCD sample."""
    from fteval.data.sources import bundled_path

    rows = [json.loads(line) for line in bundled_path("accd").read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 1 <= n <= len(rows):
        raise ValueError(f"n_prompts={n} must lie between 1 and {len(rows)} (the bundled prompt set's size)")
    return [r["input"] for r in rows[:n]]


def first_tokens_agreement(reference: list[str], other: list[str], tokenizer, k: int = 32) -> dict[str, float]:
    """How far greedy answers agree with the reference backend's on their first ``k`` tokens.

    Both texts are tokenised with the same tokenizer. ``exact`` = share of prompts whose first ``k`` tokens are
    identical (all tokens when an answer is shorter); ``prefix`` = mean share of those ``k`` positions before the
    first difference (greedy decoding continues differently after one). Hand-written: two counts.
    """
    exact, prefix = [], []
    for a, b in zip(reference, other):
        ta = tokenizer(a, add_special_tokens=False)["input_ids"][:k]
        tb = tokenizer(b, add_special_tokens=False)["input_ids"][:k]
        n = max(len(ta), len(tb), 1)
        common = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        exact.append(ta == tb)
        prefix.append(common / n)
    return {"exact": sum(exact) / len(exact), "prefix": sum(prefix) / len(prefix)}


def _run_variant(backend, variant: str, prompts: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    backend.load(variant)  # llama.cpp maps a variant's GGUF (and LoRA) on first use
    variant_load_s = time.perf_counter() - start
    start = time.perf_counter()
    backend.generate_response(prompts[0], variant)  # warm-up: caches, kernels, lazy loads (a llama.cpp variant's file)
    warmup_s = time.perf_counter() - start
    backend.records.clear()
    start = time.perf_counter()
    results = backend.batch_generate(prompts, variant)
    wall = time.perf_counter() - start
    completion = sum(r.completion_tokens for r in results)
    metrics = generation_metrics(completion, wall, [r.latency_s for r in results], [r.memory_bytes for r in backend.records])
    return {
        "served": backend.describe(variant),
        "n_prompts": len(prompts),
        "prompt_tokens": sum(r.prompt_tokens for r in results),
        "completion_tokens": completion,
        "wall_s": wall,
        **metrics,
        "requests_per_s": len(prompts) / wall if wall > 0 else 0.0,
        "memory_kind": backend.records[-1].memory_kind,
        "variant_load_s": variant_load_s,
        "warmup_s": warmup_s,
        "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in {r.finish_reason for r in results}},
        "example": {"prompt": prompts[0], "response": results[0].text},
        "responses": [r.text for r in results],
    }


def _run_backend(name: str, kwargs: dict, variants: list[str], prompts: list[str], clients: int) -> dict[str, dict]:
    start = time.perf_counter()
    backend = create_backend(name, **kwargs)
    load_s = time.perf_counter() - start
    try:
        out = {}
        for variant in variants:
            if variant not in backend.variants:
                continue
            row = _run_variant(backend, variant, prompts)
            out[variant] = {**row, "load_s": load_s + row["variant_load_s"], "clients": clients}
        return out
    finally:
        backend.close()


def _print_table(results: dict[str, dict[str, dict]], skipped: dict[str, str]) -> None:
    header = (f"{'backend':<9} {'variant':<10} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'req/s':>6} {'clients':>7} "
              f"{'mem GiB':>7} {'load s':>6} {'agree32':>7} {'prefix':>6}")
    print(header)
    print("-" * len(header))
    for name, per_variant in results.items():
        for variant, r in per_variant.items():
            mem = f"{r['memory_gib']:.2f}" if r["memory_gib"] is not None else "-"
            agree = r.get("agreement_with_hf")
            a = (f"{agree['exact']:>7.2f} {agree['prefix']:>6.2f}" if agree else f"{'-':>7} {'-':>6}")
            print(f"{name:<9} {variant:<10} {r['tokens_per_s']:>7.1f} {r['latency_p50_s']:>7.3f} {r['latency_p95_s']:>7.3f} "
                  f"{r['requests_per_s']:>6.2f} {r['clients']:>7} {mem:>7} {r['load_s']:>6.2f} {a}")
    for name, reason in skipped.items():
        print(f"{name:<9} skipped: {reason}")


def bench_generation(
    backends: list[str] = ["hf", "llamacpp"],  # noqa: B006 (jsonargparse shows the default)
    n_prompts: int = 16,
    max_new_tokens: int = 32,
    output: Path = Path("output/m05_inference_backends/generation_bench.json"),
    model: str = "embedded",
    adapters: Optional[dict[str, str]] = None,
    gguf: str = "embedded",
    lora_ggufs: Optional[dict[str, str]] = None,
    base_url: Optional[str] = None,
    served: Optional[dict[str, str]] = None,
    concurrency: int = 4,
    extra: Optional[dict[str, Any]] = None,
    batch_size: int = 8,
    hf_cache: str = "dynamic",
    n_threads: Optional[int] = None,
    n_gpu_layers: int = 0,
    db: Optional[Path] = None,
) -> int:
    """Compare generation backends on every variant (baseline + adapters): speed, latency, memory, agreement with hf.

    Args:
        backends: any of 'hf', 'llamacpp', 'openai'.
        n_prompts: how many bundled ACCD prompts to generate for.
        max_new_tokens: tokens generated per prompt (greedy).
        output: JSON file with the results, the settings and the machine description.
        model: model for the hf backend ('embedded', a folder or a hub id; nf4 on a GPU).
        adapters: variant name -> PEFT adapter folder (``fteval fit``'s export); each runs on every backend.
        gguf: GGUF file for the llamacpp backend ('embedded' = the embedded model's GGUF).
        lora_ggufs: variant name -> llama.cpp LoRA GGUF; default ADAPTER/gguf/adapter-f16.gguf (``fteval export``).
        base_url: OpenAI-compatible server for the openai backend (e.g. http://127.0.0.1:8000/v1).
        served: variant name -> the server's model name for it (vLLM --lora-modules, Ollama tags, a llama.cpp
            server's model alias); default the server's first model as the baseline only.
        concurrency: requests in flight at once on the openai backend (requests/s under that many clients).
        extra: further fields of every openai request, e.g. ``{repeat_penalty: 1.0}`` for llama.cpp and Ollama
            servers (their default 1.1 is not plain greedy decoding).
        batch_size: prompts per generate call on the hf backend.
        hf_cache: the hf backend's KV cache, 'dynamic' or 'static' (compiled decoding on a GPU).
        n_threads: CPU threads for torch (hf) and llama.cpp (default: their own defaults).
        n_gpu_layers: llama.cpp layers on the GPU (needs a CUDA build of llama-cpp-python).
        db: experiment database to add one inference_benchmarks row per metric to (optional).
    """
    import torch

    from fteval.envinfo import collect_manifest
    from fteval.io import check_adapter_folder, write_json_atomic
    from fteval.models.export import default_lora_gguf

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends {unknown or backends} must be a non-empty list of {sorted(BACKENDS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if concurrency < 1:
        raise ValueError(f"concurrency={concurrency} must be >= 1")
    adapters = dict(adapters or {})
    if BASELINE in adapters:
        raise ValueError(f"adapter name {BASELINE!r} is reserved for the model without adapter; rename that adapter")
    for name, folder in adapters.items():
        try:
            check_adapter_folder(Path(folder))
        except (FileNotFoundError, ValueError) as exc:
            raise type(exc)(f"adapter {name!r}: {exc}") from None
    variants = [BASELINE, *adapters]
    prompts = bench_prompts(n_prompts)
    common = dict(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    loras = {name: str(default_lora_gguf(Path(folder))) for name, folder in adapters.items()}
    loras.update(lora_ggufs or {})
    skipped: dict[str, str] = {}
    for name, path in list(loras.items()):
        if name not in adapters:
            raise ValueError(f"lora_ggufs names {name!r}, which is not in adapters {sorted(adapters)}")
        if "llamacpp" in backends and not Path(path).is_file():
            skipped[f"llamacpp/{name}"] = f"no LoRA GGUF at {path}; run `python -m fteval export {adapters[name]}`"
            del loras[name]
    settings = {
        "hf": dict(model=model, adapters=adapters or None, batch_size=batch_size, cache_implementation=hf_cache,
                   **common),
        "llamacpp": dict(gguf=gguf, adapters=loras or None, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **common),
        "openai": dict(base_url=base_url or "", models=served or None, concurrency=concurrency, extra=extra, **common),
    }
    clients = {"hf": batch_size, "llamacpp": 1, "openai": concurrency}
    results: dict[str, dict[str, dict]] = {}
    previous_threads = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(n_threads)
    try:
        for name in dict.fromkeys(backends):
            if name == "openai" and not base_url:
                skipped[name] = "no --base_url given (an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)"
                continue
            print(f"[bench] {name}: {len(variants)} variant(s) x {len(prompts)} prompts x {max_new_tokens} new tokens ...",
                  flush=True)
            try:
                results[name] = _run_backend(name, settings[name], variants, prompts, clients[name])
            except BackendUnavailableError as exc:
                skipped[name] = str(exc)
            except (BackendConnectionError, BackendTimeoutError) as exc:
                skipped[name] = f"server unreachable: {exc}"
            for variant in variants:
                if name in results and variant not in results[name] and f"{name}/{variant}" not in skipped:
                    skipped[f"{name}/{variant}"] = "not served by this backend (no model name or file for it)"
    finally:
        torch.set_num_threads(previous_threads)
    if "hf" in results:
        from fteval.models.loading import load_tokenizer

        tokenizer = load_tokenizer(model)
        for name, per_variant in results.items():
            for variant, r in per_variant.items():
                if name != "hf" and variant in results["hf"]:
                    r["agreement_with_hf"] = first_tokens_agreement(results["hf"][variant]["responses"], r["responses"],
                                                                    tokenizer)
    print()
    _print_table(results, skipped)
    report = {
        "prompts": {"source": "bundled accd_sample.jsonl", "n": len(prompts)},
        "variants": variants,
        "settings": {name: settings[name] for name in backends},
        "torch_threads": n_threads or previous_threads,
        "results": results,
        "skipped": skipped,
        "machine": collect_manifest(),
    }
    write_json_atomic(Path(output), report, canonical=True)
    print(f"\nwrote {output}")
    if db is not None and results:
        from fteval.db import ExperimentDB

        units = {**GENERATION_UNITS, "requests_per_s": "requests/s", "agreement_exact_32": "fraction"}
        with ExperimentDB(db) as store:
            for name, per_variant in results.items():
                for variant, r in per_variant.items():
                    metrics = {k: r[k] for k in units if r.get(k) is not None}
                    if r.get("agreement_with_hf"):
                        metrics["agreement_exact_32"] = r["agreement_with_hf"]["exact"]
                    store.add_inference_benchmark(name, variant, metrics, units=units,
                                                  details={"served": r["served"], "settings": settings[name],
                                                           "memory_kind": r["memory_kind"], "clients": r["clients"],
                                                           "n_prompts": r["n_prompts"], "max_new_tokens": max_new_tokens})
        print(f"recorded {sum(len(v) for v in results.values())} backend/variant row(s) in {db}")
    if not results:
        print("no backend could run; see the reasons above")
        return 1
    return 0
