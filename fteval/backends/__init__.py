"""Generation backends behind one interface (:class:`GenerationBackend`).

* ``hf`` (:class:`HFBackend`): in-process transformers, PEFT adapters as variants, batched.
* ``llamacpp`` (:class:`LlamaCppBackend`): llama-cpp-python on GGUF files (extra ``llamacpp``).
* ``openai`` (:class:`OpenAIBackend`): any OpenAI-compatible HTTP server (stdlib only).

``create_backend(name, **kwargs)`` builds one by name. Backend modules are imported lazily so
``import fteval.backends`` costs nothing and a missing optional package only matters for the
backend that needs it.
"""

from __future__ import annotations

from typing import Any

from fteval.backends import base
from fteval.backends.base import (
    BASELINE,
    BackendConnectionError,
    BackendError,
    BackendResponseError,
    BackendTimeoutError,
    BackendUnavailableError,
    CallRecord,
    GenerationBackend,
    GenerationResult,
)

# The interface of base.py (without what only backend implementations use), the registry and the backends.
__all__ = [
    "BACKENDS",
    *(name for name in base.__all__ if name not in ("RawCompletion", "process_rss_bytes")),
    "HFBackend",
    "LlamaCppBackend",
    "OpenAIBackend",
    "create_backend",
]

BACKENDS = {
    "hf": ("fteval.backends.hf", "HFBackend"),
    "llamacpp": ("fteval.backends.llamacpp", "LlamaCppBackend"),
    "openai": ("fteval.backends.openai_http", "OpenAIBackend"),
}


def _backend_class(name: str) -> type[GenerationBackend]:
    import importlib

    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def create_backend(name: str, **kwargs: Any) -> GenerationBackend:
    """Build backend ``name`` ('hf', 'llamacpp', 'openai') with its constructor's keyword arguments."""
    return _backend_class(name)(**kwargs)


def __getattr__(attr: str) -> Any:  # lazy access to the backend classes
    for name, (_, cls) in BACKENDS.items():
        if attr == cls:
            return _backend_class(name)
    raise AttributeError(f"module 'fteval.backends' has no attribute {attr!r}")
