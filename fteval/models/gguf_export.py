"""PEFT adapters and merged models as GGUF files for llama.cpp and Ollama.

* :func:`lora_tensors` turns a PEFT LoRA adapter (QLoRA and GRIT exports alike) into llama.cpp's
  LoRA adapter tensors (``blk.N.attn_q.weight.lora_a`` / ``.lora_b``), :func:`write_lora_gguf`
  writes them with the adapter metadata llama.cpp reads (``general.type = adapter``,
  ``adapter.type = lora``, ``adapter.lora.alpha``).
* :func:`write_model_gguf` writes a full model (e.g. the adapter merged into its base) in f32,
  f16, bf16 or q8_0, with the tokenizer and hyperparameter metadata of the base model's GGUF.

Tensor names come from the ``gguf`` library's HF -> GGUF map (``gguf.get_tensor_name_map``, the
map transformers inverts when it loads a GGUF). llama.cpp's llama graph applies rotary embeddings
to interleaved pairs of a head's rows, Hugging Face's to its two halves, so the rows of the query
and key projections are reordered per head (:func:`permute_rotary_rows`); for a LoRA update
W = s B A only B's rows move. Architectures outside :data:`ARCHITECTURES` are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, Optional

import numpy as np

__all__ = ["ARCHITECTURES", "OUTTYPES", "GGUFExportError", "architecture", "check_base_gguf", "lora_tensors", "permute_rotary_rows",
           "write_lora_gguf", "write_model_gguf"]

# Hugging Face ``model_type`` -> GGUF architecture name; both use llama.cpp's llama graph.
ARCHITECTURES = {"llama": "llama"}
OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFExportError(ValueError):
    """An adapter or model fteval cannot write as GGUF; the message names the input and the fix."""


def architecture(hf_config) -> str:
    """The GGUF architecture of a Hugging Face config, or :class:`GGUFExportError` naming the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise GGUFExportError(
            f"model architecture {model_type!r} cannot be exported to GGUF by fteval (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}); merge with `fteval merge` and convert the merged folder with "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    return ARCHITECTURES[model_type]


def _name_map(hf_config):
    import gguf

    arch = architecture(hf_config)
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(arch_id, int(hf_config.num_hidden_layers))


def permute_rotary_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of a query/key projection (or of its LoRA B) from Hugging Face's rotate-half order to llama.cpp's.

    Per head, rows ``[h0 | h1]`` (the two halves rotated together) become interleaved
    ``h0[0], h1[0], h0[1], h1[1], ...``. Hand-written: a reshape, the inverse of the one transformers
    applies when it reads a llama GGUF.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise GGUFExportError(f"a projection with {rows} rows cannot hold {n_head} rotary heads; the model config "
                              "does not match the weights")
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(hf_name: str, name_map) -> str:
    name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise GGUFExportError(f"tensor {hf_name!r} has no llama.cpp name; fteval exports the llama architecture's "
                              "standard modules only")
    return name


def _rotary_heads(gguf_name: str, hf_config) -> Optional[int]:
    heads = int(hf_config.num_attention_heads)
    if gguf_name.endswith(".attn_q.weight"):
        return heads
    if gguf_name.endswith(".attn_k.weight"):
        return int(getattr(hf_config, "num_key_value_heads", None) or heads)
    return None


_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _check_lora_config(config: Mapping, adapter: Path) -> None:
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (only LORA)")
    if config.get("use_dora"):
        problems.append("use_dora (llama.cpp applies plain LoRA only)")
    if config.get("modules_to_save") or config.get("trainable_token_indices"):
        problems.append("modules_to_save / trainable tokens (fully trained tensors, not LoRA)")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out (transposed Conv1D weights)")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("trained biases")
    if problems:
        raise GGUFExportError(f"adapter {adapter} cannot be written as a llama.cpp LoRA: {'; '.join(problems)}; "
                              "merge it with `fteval export ADAPTER --merged` (a full model GGUF) instead")


def _scaling(config: Mapping, module: str, rank: int) -> float:
    """PEFT's scaling s of ``module`` in W + s B A (lora_alpha / r, or / sqrt(r) with rsLoRA; per-module patterns)."""
    from peft.utils.other import get_pattern_key

    alpha = float(config.get("lora_alpha", 8))
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        key = get_pattern_key(list(patterns), module)
        alpha = float(patterns.get(key, alpha))
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


def lora_tensors(adapter: Path, config: Mapping, hf_config) -> tuple[dict[str, np.ndarray], float]:
    """llama.cpp LoRA tensors of a PEFT adapter folder, and the ``adapter.lora.alpha`` to write with them.

    llama.cpp scales every pair by alpha / rank (rank = rows of lora_a). The adapter's own lora_alpha is
    written and each B is rescaled by s * rank / alpha, so a module whose PEFT scaling s differs
    (rsLoRA, alpha or rank patterns) still gets exactly s. Returns float32 arrays in PEFT's shapes:
    lora_a [r, in], lora_b [out, r].
    """
    from safetensors.numpy import load_file

    _check_lora_config(config, adapter)
    name_map = _name_map(hf_config)
    state = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise GGUFExportError(f"adapter {adapter} holds {key!r}, which is not a LoRA A/B weight of a linear layer "
                                  "(embedding LoRA and extra trained tensors are not exported); merge it with --merged")
        pairs.setdefault(match["module"], {})[match["ab"]] = value.astype(np.float32)
    if not pairs:
        raise GGUFExportError(f"adapter {adapter} holds no LoRA weights; re-export it with `fteval fit`")
    alpha = float(config.get("lora_alpha", 8))
    out: dict[str, np.ndarray] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise GGUFExportError(f"adapter {adapter}: module {module} has lora_{'A' if 'A' in ab else 'B'} only")
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        name = _gguf_name(module + ".weight", name_map)
        b = b * np.float32(_scaling(config, module, rank) * rank / alpha)
        heads = _rotary_heads(name, hf_config)
        if heads is not None:
            b = permute_rotary_rows(b, heads)
        out[name + ".lora_a"], out[name + ".lora_b"] = a, np.ascontiguousarray(b)
    return out, alpha


def _encode(array: np.ndarray, outtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor; 1-D tensors (norms) stay f32, as llama.cpp expects."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if outtype == "f32" or array.ndim < 2:
        return array, None
    if outtype == "f16":
        return array.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:  # rows that q8_0 blocks cannot tile stay f16
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def _write(writer, tensors: Mapping[str, np.ndarray], outtype: str) -> None:
    for name, array in tensors.items():
        data, raw = _encode(array, outtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_lora_gguf(path: Path, tensors: Mapping[str, np.ndarray], alpha: float, arch: str, name: str,
                    outtype: OutType = "f16") -> Path:
    """A llama.cpp LoRA adapter GGUF (load with ``llama-cli --lora``, ``Llama(lora_path=...)``, Ollama ``ADAPTER``)."""
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    writer = gguf.GGUFWriter(str(path), arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name)
    _write(writer, tensors, outtype)
    return Path(path)


_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_* (gguf.LlamaFileType)
_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version", "general.name")


def check_base_gguf(base_gguf: Path, hf_config, reader=None) -> None:
    """Raise :class:`GGUFExportError` unless ``base_gguf`` describes the model of ``hf_config`` (architecture,
    layers, width, heads): its metadata is what a merged GGUF is written with."""
    import gguf

    arch = architecture(hf_config)
    reader = reader if reader is not None else gguf.GGUFReader(str(base_gguf))

    def value(key):
        field = reader.fields.get(key)
        return field.contents() if field is not None else None

    expected = {"general.architecture": arch, f"{arch}.block_count": int(hf_config.num_hidden_layers),
                f"{arch}.embedding_length": int(hf_config.hidden_size),
                f"{arch}.attention.head_count": int(hf_config.num_attention_heads)}
    for key, want in expected.items():
        got = value(key)
        if got != want:
            raise GGUFExportError(
                f"base GGUF {base_gguf} does not describe this model ({key} = {got!r}, the model has {want!r}); "
                "pass the GGUF of the adapter's base model as --base_gguf")


def write_model_gguf(path: Path, state_dict: Mapping[str, "object"], hf_config, base_gguf: Path, name: str,
                     outtype: OutType = "f16") -> Path:
    """A full model GGUF from a Hugging Face state dict, with ``base_gguf``'s metadata (tokenizer, chat template,
    hyperparameters) and the tensors of ``state_dict`` in ``outtype``.

    Tied output embeddings are not written (llama.cpp then uses ``token_embd``); rotary buffers are skipped.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    arch = architecture(hf_config)
    name_map = _name_map(hf_config)
    reader = gguf.GGUFReader(str(base_gguf))
    check_base_gguf(Path(base_gguf), hf_config, reader)
    tensors: dict[str, np.ndarray] = {}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    for hf_name, value in state_dict.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        gname = _gguf_name(hf_name, name_map)
        array = value.detach().float().cpu().numpy() if hasattr(value, "detach") else np.asarray(value, np.float32)
        heads = _rotary_heads(gname, hf_config)
        tensors[gname] = permute_rotary_rows(array, heads) if heads is not None else array
    writer = gguf.GGUFWriter(str(path), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _NOT_COPIED:
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write(writer, tensors, outtype)
    return Path(path)
