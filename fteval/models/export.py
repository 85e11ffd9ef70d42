"""``fteval export``: an adapter as llama.cpp / Ollama files (a LoRA GGUF, or the merged model as one GGUF).

Layout of the output folder (default ``ADAPTER_DIR/gguf``):

* ``adapter-<outtype>.gguf``: the llama.cpp LoRA adapter (without ``--merged``);
* ``model-<outtype>.gguf``: the adapter merged into its base (with ``--merged``);
* ``Modelfile``: an Ollama model definition, ``FROM`` the base GGUF plus ``ADAPTER`` the LoRA GGUF,
  or ``FROM`` the merged GGUF (``ollama create NAME -f Modelfile``);
* ``export.json``: what was written from what.

:func:`default_lora_gguf` is where ``fteval test`` and ``fteval bench generation`` look for an
adapter's LoRA GGUF when none is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

from fteval.io import atomic_directory, check_adapter_folder, check_writable_directory
from fteval.models.gguf_export import (OUTTYPES, GGUFExportError, OutType, architecture, check_base_gguf, lora_tensors,
                                       write_lora_gguf, write_model_gguf)

__all__ = ["default_lora_gguf", "export", "modelfile_text"]

EXPORT_SUBDIR = "gguf"


def default_lora_gguf(adapter: Path, outtype: str = "f16") -> Path:
    """``ADAPTER_DIR/gguf/adapter-<outtype>.gguf``: where ``fteval export ADAPTER_DIR`` writes the LoRA GGUF."""
    return Path(adapter) / EXPORT_SUBDIR / f"adapter-{outtype}.gguf"


def modelfile_text(from_: str, adapter: Optional[str] = None) -> str:
    """An Ollama Modelfile: ``FROM`` a model GGUF (absolute, or ``./`` beside the Modelfile), optional ``ADAPTER``.

    Ollama takes the chat template from the GGUF's ``tokenizer.chat_template``; temperature 0 and no
    repetition penalty (Ollama's default is 1.1) make its answers greedy like fteval's evaluation.
    """
    lines = ["# Ollama model definition written by `fteval export`; create it with: ollama create NAME -f Modelfile",
             f"FROM {from_}"]
    if adapter is not None:
        lines.append(f"ADAPTER {adapter}")
    lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    return "\n".join(lines) + "\n"


def _base_gguf(base_name: str, base_gguf: Optional[str]) -> Path:
    from fteval.backends.llamacpp import resolve_gguf
    from fteval.models.loading import embedded_gguf_path, is_embedded

    if base_gguf is not None:
        return resolve_gguf(base_gguf)
    if is_embedded(base_name):
        return embedded_gguf_path()
    raise GGUFExportError(
        f"the adapter's base {base_name!r} has no GGUF that fteval knows; convert the base once with llama.cpp's "
        "convert_hf_to_gguf.py (or take it from Ollama) and pass it as --base_gguf FILE.gguf"
    )


def export(
    adapter: Path,
    format: Literal["gguf"] = "gguf",
    output: Optional[Path] = None,
    merged: bool = False,
    outtype: OutType = "f16",
    base_gguf: Optional[str] = None,
    base_model: Optional[str] = None,
    quantization: str = "auto",
    tolerance: float = 1e-3,
    cache_dir: Optional[Path] = None,
    overwrite: bool = False,
) -> int:
    """Export a QLoRA/GRIT adapter for llama.cpp and Ollama: a LoRA GGUF (or the merged model GGUF) and a Modelfile.

    Args:
        adapter: PEFT adapter folder written by ``fteval fit`` (adapter_config.json + adapter_model.safetensors).
        format: 'gguf' (llama.cpp, Ollama).
        output: output folder (written atomically); default ADAPTER/gguf.
        merged: write the adapter merged into its base as one model GGUF instead of a LoRA GGUF (QLoRA
            adapters are merged into the dequantised 4-bit base they were trained on, as ``fteval merge`` does).
        outtype: tensor type: 'f16' (default), 'bf16', 'q8_0' or 'f32'; norms stay f32.
        base_gguf: GGUF of the base model: the Modelfile's FROM and, with --merged, the source of the
            tokenizer and chat-template metadata; default the embedded model's GGUF for embedded adapters.
        base_model: base model for --merged; default the adapter's base_model_name_or_path.
        quantization: base quantisation in training for --merged: 'auto' (the adapter's fteval_run.json), 'nf4', 'none'.
        tolerance: --merged: largest allowed |merged - base+adapter| logit difference before anything is written.
        cache_dir: embedded-model cache.
        overwrite: replace what an earlier export wrote into ``output``.
    """
    from transformers import AutoConfig

    from fteval.models.loading import resolve_model_path

    if format != "gguf":
        raise ValueError(f"format={format!r}: fteval exports 'gguf' (llama.cpp, Ollama); vLLM serves the PEFT folder itself")
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype={outtype!r} is not one of {', '.join(OUTTYPES)}")
    adapter = Path(adapter)
    config = check_adapter_folder(adapter)
    output = Path(output) if output is not None else adapter / EXPORT_SUBDIR
    check_writable_directory(output, overwrite)
    base_name = base_model or config.get("base_model_name_or_path") or "embedded"
    hf_config = AutoConfig.from_pretrained(resolve_model_path(base_name, cache_dir))
    arch = architecture(hf_config)  # refuse unsupported architectures before any work
    base = _base_gguf(base_name, base_gguf)
    if merged:
        check_base_gguf(base, hf_config)  # its metadata goes into the merged file: check it before merging
    name = f"{adapter.resolve().parent.name}-{adapter.name}"
    with atomic_directory(output, overwrite=overwrite) as tmp:
        if merged:
            from fteval.models.merge import merged_model

            model, _ = merged_model(adapter, base_model or base_name, quantization, tolerance, cache_dir, target=output)
            written = f"model-{outtype}.gguf"
            write_model_gguf(tmp / written, model.state_dict(), hf_config, base, name, outtype)
            modelfile = modelfile_text(f"./{written}")
        else:
            tensors, alpha = lora_tensors(adapter, config, hf_config)
            written = f"adapter-{outtype}.gguf"
            write_lora_gguf(tmp / written, tensors, alpha, arch, name, outtype)
            modelfile = modelfile_text(str(base.resolve()), f"./{written}")
        (tmp / "Modelfile").write_text(modelfile)
        (tmp / "export.json").write_text(json.dumps(
            {"adapter": str(adapter.resolve()), "base_model": base_name, "base_gguf": str(base.resolve()),
             "merged": merged, "outtype": outtype, "file": written, "architecture": arch}, indent=2) + "\n")
    print(f"wrote {output / written} and {output / 'Modelfile'}")
    print(f"llama.cpp: llama-server -m {base if not merged else output / written}"
          + ("" if merged else f" --lora {output / written}"))
    return 0
