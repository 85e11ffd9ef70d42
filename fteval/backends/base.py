"""The generation interface every backend implements, its result types, and its errors.

A backend turns prompts into completions for a named model *variant* (``"baseline"``, or an
adapter name): :meth:`GenerationBackend.generate_response` for one prompt,
:meth:`GenerationBackend.batch_generate` for many. Each call is timed and its memory recorded:

* per completion, :class:`GenerationResult` (text, token counts, latency, tokens/s);
* per call, one :class:`CallRecord` appended to :attr:`GenerationBackend.records` (the batch's
  wall time, aggregate throughput and memory: the CUDA peak allocated during the call when the
  backend runs on a GPU, else the process RSS right after the call; ``None`` for remote servers).

Decoding is greedy by default (``temperature=0``); with ``temperature > 0`` the backend samples
with its seed, so a call is reproducible either way.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = [
    "BASELINE",
    "GENERATION_UNITS",
    "generation_metrics",
    "BackendConnectionError",
    "BackendError",
    "BackendResponseError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CallRecord",
    "GenerationBackend",
    "GenerationResult",
    "RawCompletion",
    "process_rss_bytes",
]

BASELINE = "baseline"  # the variant name of the model without any adapter


class BackendError(RuntimeError):
    """A backend could not produce completions; the message says why and how to fix it."""


class BackendUnavailableError(BackendError, ImportError):
    """The backend's optional package is not installed; the message names the extra to install."""


class BackendConnectionError(BackendError):
    """An HTTP backend's server could not be reached (refused, unknown host, reset)."""


class BackendTimeoutError(BackendError):
    """An HTTP backend's server did not answer within the timeout, after all retries."""


class BackendResponseError(BackendError):
    """A server answered with something that is not a valid completion (non-JSON, no choices, HTTP error)."""


@dataclass(frozen=True)
class GenerationResult:
    """One completion.

    ``latency_s`` is the wall time (seconds) this completion took: for a batched backend, the
    time of the batch it was generated in. ``tokens_per_s = completion_tokens / latency_s``.
    Token counts exclude the end-of-sequence token.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    tokens_per_s: float
    model: str = BASELINE
    backend: str = ""
    finish_reason: Optional[str] = None  # "stop" (EOS), "length" (max_new_tokens), or the server's reason


@dataclass(frozen=True)
class CallRecord:
    """Timing and memory of one ``batch_generate`` call (``generate_response`` is a batch of one).

    ``tokens_per_s`` is the aggregate throughput: all completion tokens of the call divided by
    its wall time. ``memory_bytes`` is measured as ``memory_kind`` says: ``"cuda_max_allocated"``
    (peak during the call, ``torch.cuda.max_memory_allocated``), ``"process_rss"`` (resident set
    of this process right after the call) or ``"not_measured"`` (a remote server; then None).
    """

    backend: str
    model: str
    n_prompts: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    tokens_per_s: float
    memory_bytes: Optional[int]
    memory_kind: str


GENERATION_UNITS = {"tokens_per_s": "tokens/s", "latency_p50_s": "s", "latency_p95_s": "s", "latency_mean_s": "s",
                    "memory_gib": "GiB", "load_s": "s"}


def generation_metrics(completion_tokens: int, wall_s: float, latencies: Sequence[float],
                       memory_bytes: Sequence[Optional[int]] = ()) -> dict[str, Optional[float]]:
    """Throughput and latency of a set of generations, as ``fteval bench generation`` and ``fteval test`` record them.

    ``tokens_per_s`` = all completion tokens / ``wall_s``; ``latency_p50_s``/``latency_p95_s``/``latency_mean_s``
    over the per-completion latencies (a batched backend's completion takes its batch's time);
    ``memory_gib`` = the largest measured peak (None when none was measured).
    """
    lat = np.asarray(list(latencies), dtype=float)
    measured = [m for m in memory_bytes if m is not None]
    return {"tokens_per_s": completion_tokens / wall_s if wall_s > 0 else 0.0,
            "latency_p50_s": float(np.percentile(lat, 50)) if lat.size else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if lat.size else None,
            "latency_mean_s": float(lat.mean()) if lat.size else None,
            "memory_gib": max(measured) / 2**30 if measured else None}


@dataclass(frozen=True)
class RawCompletion:
    """What a backend's ``_generate`` returns per prompt; ``latency_s=None`` means "the whole call"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Optional[str] = None
    latency_s: Optional[float] = None


def process_rss_bytes() -> int:
    """Resident set size of this process in bytes (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


class GenerationBackend(abc.ABC):
    """Base class: subclasses implement :meth:`_generate` and :attr:`variants`; timing lives here.

    Args:
        max_new_tokens: most tokens generated per completion.
        temperature: 0 for greedy decoding (default); > 0 samples with ``top_p`` and ``seed``.
        top_p: nucleus sampling mass (only used when sampling).
        seed: seed for sampling (and for backends that take one even when greedy).
    """

    name: str = "base"

    def __init__(self, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> None:
        if int(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p} must lie in (0, 1]")
        self.max_new_tokens = int(max_new_tokens)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = int(seed)
        self.records: list[CallRecord] = []

    # ------------------------------------------------------------------ subclass hooks
    @property
    @abc.abstractmethod
    def variants(self) -> list[str]:
        """Model variant names this backend can generate with (``"baseline"`` first)."""

    @abc.abstractmethod
    def _generate(self, prompts: list[str], model: str) -> list[RawCompletion]:
        """Completions for ``prompts`` (same order) with variant ``model`` (already validated)."""

    def load(self, variant: str) -> None:
        """Load what ``variant`` needs now rather than on its first call (a backend that loads lazily overrides it)."""
        self.check_variant(variant)

    def describe(self, variant: str) -> str:
        """What serves ``variant`` on this backend, in a few words (a file, a served model name)."""
        return self.check_variant(variant)

    def _memory(self) -> tuple[Optional[int], str]:
        """Memory after a call: (bytes, kind); see :class:`CallRecord`."""
        return process_rss_bytes(), "process_rss"

    def _before_call(self) -> None:
        """Hook run right before the timer starts (e.g. reset CUDA peak statistics)."""

    # ------------------------------------------------------------------ public API
    def check_variant(self, model: str) -> str:
        """Return ``model`` if it names a known variant, else raise a ValueError listing them."""
        if model not in self.variants:
            raise ValueError(
                f"model variant {model!r} is not available on the {self.name} backend; choose one of "
                f"{self.variants} (adapters are registered when the backend is created)"
            )
        return model

    def generate_response(self, prompt: str, model: str = BASELINE) -> GenerationResult:
        """One completion of ``prompt`` by variant ``model``."""
        return self.batch_generate([prompt], model)[0]

    def batch_generate(self, prompts: Sequence[str], model: str = BASELINE) -> list[GenerationResult]:
        """Completions of ``prompts`` (same order) by variant ``model``; appends one :class:`CallRecord`."""
        if isinstance(prompts, str):
            raise ValueError("batch_generate takes a list of prompts; use generate_response for a single string")
        prompts = list(prompts)
        if not prompts:
            return []
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")
        self.check_variant(model)
        self._before_call()
        start = time.perf_counter()
        raws = self._generate(prompts, model)
        wall = time.perf_counter() - start
        if len(raws) != len(prompts):
            raise BackendError(f"{self.name} backend returned {len(raws)} completions for {len(prompts)} prompts")
        memory, kind = self._memory()
        results = []
        for raw in raws:
            latency = raw.latency_s if raw.latency_s is not None else wall
            results.append(
                GenerationResult(
                    text=raw.text,
                    prompt_tokens=int(raw.prompt_tokens),
                    completion_tokens=int(raw.completion_tokens),
                    latency_s=latency,
                    tokens_per_s=raw.completion_tokens / latency if latency > 0 else 0.0,
                    model=model,
                    backend=self.name,
                    finish_reason=raw.finish_reason,
                )
            )
        n_completion = sum(r.completion_tokens for r in results)
        self.records.append(
            CallRecord(
                backend=self.name,
                model=model,
                n_prompts=len(prompts),
                prompt_tokens=sum(r.prompt_tokens for r in results),
                completion_tokens=n_completion,
                wall_s=wall,
                tokens_per_s=n_completion / wall if wall > 0 else 0.0,
                memory_bytes=memory,
                memory_kind=kind,
            )
        )
        return results

    def close(self) -> None:
        """Release resources (models, sessions); the backend is unusable afterwards."""

    def __enter__(self) -> "GenerationBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
