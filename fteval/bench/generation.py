"""``fteval bench generation`` (m05): the available generation backends on the same prompts, side by side.

Each backend is built (load time recorded), warmed up with one request, then asked for the
same ``n_prompts`` bundled ACCD prompts (the first rows of ``accd_sample.jsonl``, balanced
safe/unsafe) with greedy decoding and the same ``max_new_tokens``. Reported per backend:

* ``tokens_per_s``: all completion tokens / wall time of the whole run (throughput);
* ``latency_p50_s`` / ``latency_p95_s``: per-prompt latency percentiles (for the batched hf
  backend a prompt's latency is its batch's time, so they are batch latencies);
* ``memory_gib`` and how it was measured (CUDA peak allocated, or process RSS: the in-process
  backends share one process, so RSS includes what earlier backends left loaded);
* ``load_s``, prompt and completion token totals.

A backend whose package is missing (or, for ``openai``, whose server is unreachable or not
given) is skipped with its reason printed and recorded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from fteval.backends import BACKENDS, BackendConnectionError, BackendTimeoutError, BackendUnavailableError, create_backend
from fteval.backends.base import GENERATION_UNITS, generation_metrics

__all__ = ["bench_generation", "bench_prompts"]



def bench_prompts(n: int) -> list[str]:
    """The first ``n`` prompts (``input``) of the bundled ACCD sample."""
    from fteval.data.sources import bundled_path

    rows = [json.loads(line) for line in bundled_path("accd").read_text(encoding="utf-8").splitlines() if line.strip()]
    if not 1 <= n <= len(rows):
        raise ValueError(f"n_prompts={n} must lie between 1 and {len(rows)} (the bundled prompt set's size)")
    return [r["input"] for r in rows[:n]]


def _run_one(name: str, kwargs: dict, prompts: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    backend = create_backend(name, **kwargs)
    load_s = time.perf_counter() - start
    try:
        backend.generate_response(prompts[0])  # warm-up: caches, kernels, lazy loads
        backend.records.clear()
        start = time.perf_counter()
        results = backend.batch_generate(prompts)
        wall = time.perf_counter() - start
        completion = sum(r.completion_tokens for r in results)
        metrics = generation_metrics(completion, wall, [r.latency_s for r in results],
                                     [r.memory_bytes for r in backend.records])
        return {
            "n_prompts": len(prompts),
            "prompt_tokens": sum(r.prompt_tokens for r in results),
            "completion_tokens": completion,
            "wall_s": wall,
            **metrics,
            "memory_kind": backend.records[-1].memory_kind,
            "load_s": load_s,
            "finish_reasons": {k: sum(r.finish_reason == k for r in results) for k in {r.finish_reason for r in results}},
            "example": {"prompt": prompts[0], "response": results[0].text},
        }
    finally:
        backend.close()


def _print_table(results: dict[str, dict], skipped: dict[str, str]) -> None:
    header = f"{'backend':<10} {'tok/s':>8} {'p50 s':>8} {'p95 s':>8} {'mem GiB':>8} {'memory':<20} {'load s':>7} {'tokens':>7}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        mem = f"{r['memory_gib']:.2f}" if r["memory_gib"] is not None else "-"
        print(f"{name:<10} {r['tokens_per_s']:>8.1f} {r['latency_p50_s']:>8.3f} {r['latency_p95_s']:>8.3f} {mem:>8} "
              f"{r['memory_kind']:<20} {r['load_s']:>7.2f} {r['completion_tokens']:>7}")
    for name, reason in skipped.items():
        print(f"{name:<10} skipped: {reason}")


def bench_generation(
    backends: list[str] = ["hf", "llamacpp"],  # noqa: B006 (jsonargparse shows the default)
    n_prompts: int = 16,
    max_new_tokens: int = 32,
    output: Path = Path("output/m05_inference_backends/generation_bench.json"),
    model: str = "embedded",
    gguf: str = "embedded",
    base_url: Optional[str] = None,
    batch_size: int = 8,
    n_threads: Optional[int] = None,
    n_gpu_layers: int = 0,
    db: Optional[Path] = None,
) -> int:
    """Compare generation backends on the same prompts: tokens/s, latency p50/p95, memory.

    Args:
        backends: any of 'hf', 'llamacpp', 'openai'.
        n_prompts: how many bundled ACCD prompts to generate for.
        max_new_tokens: tokens generated per prompt (greedy).
        output: JSON file with the results, the settings and the machine description.
        model: model for the hf backend ('embedded', a folder or a hub id; nf4 on a GPU).
        gguf: GGUF file for the llamacpp backend ('embedded' = the embedded model's GGUF).
        base_url: OpenAI-compatible server for the openai backend (e.g. http://127.0.0.1:8000/v1).
        batch_size: prompts per generate call on the hf backend.
        n_threads: CPU threads for torch (hf) and llama.cpp (default: their own defaults).
        n_gpu_layers: llama.cpp layers on the GPU (needs a CUDA build of llama-cpp-python).
        db: experiment database to add one inference_benchmarks row per metric to (optional).
    """
    import torch

    from fteval.envinfo import collect_manifest
    from fteval.io import write_json_atomic

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"backends {unknown or backends} must be a non-empty list of {sorted(BACKENDS)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    prompts = bench_prompts(n_prompts)
    common = dict(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    settings = {
        "hf": dict(model=model, batch_size=batch_size, **common),
        "llamacpp": dict(gguf=gguf, n_threads=n_threads, n_gpu_layers=n_gpu_layers, **common),
        "openai": dict(base_url=base_url or "", **common),
    }
    results: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    previous_threads = torch.get_num_threads()
    if n_threads:
        torch.set_num_threads(n_threads)
    try:
        for name in dict.fromkeys(backends):
            if name == "openai" and not base_url:
                skipped[name] = "no --base_url given (an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)"
                continue
            print(f"[bench] {name}: {len(prompts)} prompts x {max_new_tokens} new tokens ...", flush=True)
            try:
                results[name] = _run_one(name, settings[name], prompts)
            except BackendUnavailableError as exc:
                skipped[name] = str(exc)
            except (BackendConnectionError, BackendTimeoutError) as exc:
                skipped[name] = f"server unreachable: {exc}"
    finally:
        torch.set_num_threads(previous_threads)
    print()
    _print_table(results, skipped)
    report = {
        "prompts": {"source": "bundled accd_sample.jsonl", "n": len(prompts)},
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

        units = GENERATION_UNITS
        with ExperimentDB(db) as store:
            for name, r in results.items():
                metrics = {k: r[k] for k in units if r.get(k) is not None}
                store.add_inference_benchmark(name, model if name == "hf" else (gguf if name == "llamacpp" else base_url),
                                              metrics, units=units,
                                              details={"settings": settings[name], "memory_kind": r["memory_kind"],
                                                       "n_prompts": r["n_prompts"], "max_new_tokens": max_new_tokens})
        print(f"recorded {len(results)} backend(s) in {db}")
    if not results:
        print("no backend could run; see the reasons above")
        return 1
    return 0
