"""Generation with llama.cpp through llama-cpp-python (``llamacpp`` backend), on GGUF files.

The embedded default's GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``) works as it is. Prompts go
through ``create_chat_completion``, which applies the chat template stored in the GGUF's
metadata; ``raw=True`` sends them to ``create_completion`` unchanged. Prompts run one after
another (llama-cpp-python's high-level API has no batched generation), so each completion has
its own latency.

Variants: ``"baseline"`` is ``gguf``; ``variants`` maps further names to other GGUF files (e.g. an
adapter merged into its base by ``fteval export ADAPTER --merged``), ``adapters`` maps names to
llama.cpp LoRA GGUFs (``fteval export ADAPTER``) applied on top of ``gguf``. Each variant is
loaded on first use and kept (a LoRA variant loads its own copy of the memory-mapped base).

Install: ``pip install 'fteval[llamacpp]'`` (llama-cpp-python has no PyPI wheel; it compiles
llama.cpp, which takes minutes (README, install); ``CMAKE_ARGS="-DGGML_NATIVE=OFF"`` builds a portable
binary, ``CMAKE_ARGS="-DGGML_CUDA=on"`` a CUDA one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

from fteval.backends.base import BASELINE, BackendUnavailableError, GenerationBackend, RawCompletion

__all__ = ["LlamaCppBackend", "import_llama_cpp", "resolve_gguf"]

INSTALL_HINT = (
    "pip install 'fteval[llamacpp]'  (builds llama-cpp-python from source, ~5-12 min; "
    "CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" for a portable CPU build)"
)


def import_llama_cpp():
    """The ``llama_cpp`` module, or :class:`BackendUnavailableError` naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the llamacpp backend needs llama-cpp-python, which is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from exc
    return llama_cpp


def resolve_gguf(path: Union[str, Path]) -> Path:
    """``"embedded"`` -> the embedded default's GGUF; otherwise an existing ``.gguf`` file."""
    from fteval.models.loading import embedded_gguf_path, is_embedded

    if is_embedded(str(path)):
        return embedded_gguf_path()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist; pass an existing .gguf file or 'embedded'")
    if p.suffix.lower() != ".gguf":
        raise ValueError(f"{p} is not a .gguf file; llama.cpp loads GGUF models only (convert with convert_hf_to_gguf.py)")
    return p


class LlamaCppBackend(GenerationBackend):
    """llama.cpp in this process.

    Args:
        gguf: the baseline model: a .gguf file or 'embedded'.
        variants: further variant name -> .gguf model file.
        adapters: further variant name -> llama.cpp LoRA adapter .gguf, applied on ``gguf``.
        n_ctx: context length in tokens (prompt + completion).
        n_threads: CPU threads for generation and prompt processing (default: all cores this
            process may use; on a machine shared with other jobs, fewer threads can be much faster).
        n_gpu_layers: layers offloaded to a GPU (needs a CUDA build; 0 = CPU only, -1 = all).
        raw: send prompts unformatted to ``create_completion``.
        system_prompt: optional system message for chat formatting.
        max_new_tokens, temperature, top_p, seed: see :class:`GenerationBackend`.
    """

    name = "llamacpp"

    def __init__(
        self,
        gguf: Union[str, Path] = "embedded",
        variants: Optional[Mapping[str, Union[str, Path]]] = None,
        adapters: Optional[Mapping[str, Union[str, Path]]] = None,
        n_ctx: int = 2048,
        n_threads: Optional[int] = None,
        n_gpu_layers: int = 0,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        raw: bool = False,
        system_prompt: Optional[str] = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        self._llama_cpp = import_llama_cpp()
        if int(n_ctx) < 16:
            raise ValueError(f"n_ctx={n_ctx} is too small; use at least a few hundred tokens (default 2048)")
        self.paths: dict[str, Path] = {BASELINE: resolve_gguf(gguf)}
        for name, path in dict(variants or {}).items():
            if name == BASELINE:
                raise ValueError(f"variant name {BASELINE!r} is the gguf= model; give the other file another name")
            self.paths[name] = resolve_gguf(path)
        self.loras: dict[str, Path] = {}
        for name, path in dict(adapters or {}).items():
            if name in self.paths:
                raise ValueError(f"variant name {name!r} is given twice (a model and an adapter); rename one")
            self.paths[name] = self.paths[BASELINE]
            self.loras[name] = resolve_gguf(path)
        self.n_ctx = int(n_ctx)
        self.n_threads = int(n_threads) if n_threads else len(os.sched_getaffinity(0))
        self.n_gpu_layers = int(n_gpu_layers)
        self.raw = bool(raw)
        self.system_prompt = system_prompt
        self.verbose = bool(verbose)
        self._models: dict[str, object] = {}

    @property
    def variants(self) -> list[str]:
        return list(self.paths)

    def llama(self, variant: str = BASELINE):
        """The ``llama_cpp.Llama`` of ``variant`` (loaded on first use)."""
        self.check_variant(variant)
        if variant not in self._models:
            self._models[variant] = self._llama_cpp.Llama(
                model_path=str(self.paths[variant]),
                lora_path=str(self.loras[variant]) if variant in self.loras else None,
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,  # prompt processing; llama-cpp-python's default is every core
                n_gpu_layers=self.n_gpu_layers,
                seed=self.seed,
                verbose=self.verbose,
            )
        return self._models[variant]

    def load(self, variant: str) -> None:
        self.llama(variant)

    def describe(self, variant: str) -> str:
        """What ``variant`` runs: its GGUF file, plus ``+ LORA.gguf`` for an adapter."""
        lora = f" + {self.loras[variant].name}" if variant in self.loras else ""
        return f"{self.paths[self.check_variant(variant)].name}{lora}"

    def _generate(self, prompts: list[str], model: str) -> list[RawCompletion]:
        import time

        llm = self.llama(model)
        sampling = dict(
            max_tokens=self.max_new_tokens,
            temperature=self.temperature,  # 0.0 = greedy in llama-cpp-python
            top_p=self.top_p,
            seed=self.seed,
            repeat_penalty=1.0,  # plain greedy/sampling, like the hf backend
        )
        out = []
        for prompt in prompts:
            start = time.perf_counter()
            if self.raw:
                resp = llm.create_completion(prompt, **sampling)
                text = resp["choices"][0]["text"]
            else:
                messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
                    {"role": "user", "content": prompt}
                ]
                resp = llm.create_chat_completion(messages=messages, **sampling)
                text = resp["choices"][0]["message"]["content"] or ""
            latency = time.perf_counter() - start
            usage = resp["usage"]
            out.append(
                RawCompletion(
                    text=text.strip(),
                    prompt_tokens=int(usage["prompt_tokens"]),
                    completion_tokens=int(usage["completion_tokens"]),
                    finish_reason=resp["choices"][0].get("finish_reason"),
                    latency_s=latency,
                )
            )
        return out

    def close(self) -> None:
        for llm in self._models.values():
            llm.close()  # frees the model now, not in __del__ at interpreter shutdown
        self._models.clear()
