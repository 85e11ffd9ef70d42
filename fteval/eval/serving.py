"""The generation backend of ``fteval test``'s behaviour part: the evaluated model in process, or as it is served.

* ``hf``: the evaluated HF model itself, adapters switched per variant (the default);
* ``llamacpp``: llama.cpp in this process, the base GGUF plus each adapter's LoRA GGUF
  (``fteval export ADAPTER_DIR`` writes it to ``ADAPTER_DIR/gguf/adapter-f16.gguf``, where it is looked for);
* ``openai``: an OpenAI-compatible server (vLLM ``--enable-lora --lora-modules``, Ollama tags,
  ``llama-server --lora``, ``python -m llama_cpp.server``) with one served model name per variant.

AQI always runs on the HF model's hidden states; only the answers (and so the refusal labels and
the G-Eval scores of those answers) come from the chosen backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from fteval.backends.base import BASELINE, GenerationBackend

__all__ = ["BEHAVIOUR_BACKENDS", "BehaviourBackendName", "behaviour_backend"]

BehaviourBackendName = Literal["hf", "llamacpp", "openai"]
BEHAVIOUR_BACKENDS = ("hf", "llamacpp", "openai")
_LLAMACPP_OPTIONS = {"gguf", "adapters", "n_ctx", "n_threads", "n_gpu_layers", "verbose"}
_HF_OPTIONS = {"batch_size", "cache_implementation"}
_OPENAI_OPTIONS = {"base_url", "models", "api_key", "endpoint", "timeout_s", "max_retries", "backoff_s",
                   "backoff_max_s", "concurrency", "extra"}


def _unknown(kind: str, options: dict, allowed: set[str]) -> None:
    extra = sorted(set(options) - allowed)
    if extra:
        raise ValueError(f"behaviour_backend_options {extra} are not options of the {kind} backend; "
                         f"use {sorted(allowed)}")


def _llamacpp(options: dict, model_name_or_path: str, adapters: dict[str, str], common: dict) -> GenerationBackend:
    from fteval.backends.llamacpp import LlamaCppBackend
    from fteval.models.export import default_lora_gguf
    from fteval.models.loading import is_embedded

    options = dict(options)
    _unknown("llamacpp", options, _LLAMACPP_OPTIONS)
    gguf = options.pop("gguf", None)
    if gguf is None:
        if not is_embedded(model_name_or_path):
            raise ValueError(f"behaviour_backend llamacpp needs the base model {model_name_or_path!r} as GGUF; set "
                             "model.init_args.behaviour_backend_options: {gguf: BASE.gguf}")
        gguf = "embedded"
    loras = dict(options.pop("adapters", None) or {})
    unknown = sorted(set(loras) - set(adapters))
    if unknown:
        raise ValueError(f"behaviour_backend_options.adapters names {unknown}, which are not among the evaluated "
                         f"adapters {sorted(adapters)}")
    for name, folder in adapters.items():
        if name not in loras:
            path = default_lora_gguf(Path(folder))
            if not path.is_file():
                raise FileNotFoundError(
                    f"adapter {name!r} has no llama.cpp LoRA GGUF at {path}; export it with `python -m fteval export "
                    f"{folder}`, or name its GGUF in model.init_args.behaviour_backend_options.adapters")
            loras[name] = str(path)
    return LlamaCppBackend(gguf, adapters=loras, **options, **common)


def _openai(options: dict, adapters: dict[str, str], common: dict) -> GenerationBackend:
    from fteval.backends.openai_http import OpenAIBackend

    options = dict(options)
    _unknown("openai", options, _OPENAI_OPTIONS)
    if "base_url" not in options:
        raise ValueError("behaviour_backend openai needs the server: set model.init_args.behaviour_backend_options: "
                         "{base_url: http://HOST:PORT/v1, models: {baseline: NAME, ADAPTER: NAME, ...}}")
    models = dict(options.pop("models", None) or {})
    missing = [v for v in [BASELINE, *adapters] if v not in models]
    if missing:
        raise ValueError(f"behaviour_backend openai needs one served model name per variant; behaviour_backend_options"
                         f".models lacks {missing} (e.g. vLLM `--lora-modules {missing[-1]}=ADAPTER_DIR`)")
    extra = sorted(set(models) - {BASELINE, *adapters})
    if extra:
        raise ValueError(f"behaviour_backend_options.models names {extra}, which are not evaluated variants "
                         f"{[BASELINE, *adapters]}")
    return OpenAIBackend(models=models, **options, **common)


def behaviour_backend(kind: str, options: Optional[dict[str, Any]], *, model, tokenizer, model_name_or_path: str,
                      adapters: dict[str, str], batch_size: int, max_new_tokens: int, template: str,
                      system_prompt: Optional[str]) -> GenerationBackend:
    """The backend ``fteval test`` generates its behaviour answers with (greedy, ``max_new_tokens``).

    Args:
        kind: 'hf', 'llamacpp' or 'openai'.
        options: the backend's options (``behaviour_backend_options``): hf ``batch_size`` (prompts per
            ``generate`` call; default the data's ``eval_batch_size``) and ``cache_implementation``
            ('dynamic' or 'static': a fixed-size KV cache, whose decoding step transformers compiles on a GPU); llamacpp ``gguf`` (default the
            embedded GGUF), ``adapters`` (name -> LoRA GGUF; default ADAPTER_DIR/gguf/adapter-f16.gguf),
            ``n_ctx``, ``n_threads``, ``n_gpu_layers``; openai ``base_url``, ``models`` (variant -> served
            name, every variant), ``api_key``, ``endpoint``, ``timeout_s``, ``concurrency``, ...
        model, tokenizer: the evaluated HF model (the hf backend generates with it).
        model_name_or_path, adapters: the evaluated base and adapter folders (name -> folder).
    """
    options = dict(options or {})
    common = dict(max_new_tokens=max_new_tokens, temperature=0.0, system_prompt=system_prompt)
    if kind == "hf":
        _unknown("hf", options, _HF_OPTIONS)
        from fteval.backends.hf import HFBackend

        batch_size = options.pop("batch_size", batch_size)  # default: the data's eval_batch_size
        return HFBackend(model, tokenizer, batch_size=batch_size, template=template, **options, **common)
    if kind == "llamacpp":
        return _llamacpp(options, model_name_or_path, adapters, common)
    if kind == "openai":
        return _openai(options, adapters, common)
    raise ValueError(f"behaviour_backend={kind!r} is not one of {', '.join(BEHAVIOUR_BACKENDS)}")
