"""``fteval merge``: write a full model = dequantised base + adapter, checked against the adapter model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from fteval.io import atomic_directory, check_adapter_folder, check_writable_directory
from fteval.models.loading import load_causal_lm


def _adapter_base(adapter: Path) -> str:
    return check_adapter_folder(adapter).get("base_model_name_or_path") or "embedded"


def merged_model(adapter: Path, base_model: Optional[str] = None, quantization: str = "auto", tolerance: float = 1e-3,
                 cache_dir: Optional[Path] = None, target: Optional[Path] = None):
    """(merged model, tokenizer): ``adapter`` merged into its (dequantised) base, checked against base + adapter.

    Raises ``ValueError`` (nothing written to ``target``) when the merged logits differ by more than ``tolerance``.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    base_name = base_model or _adapter_base(adapter)
    if quantization == "auto":
        run = adapter / "fteval_run.json"
        quantization = json.loads(run.read_text())["hparams"].get("quantization", "none") if run.is_file() else "none"
    loaded = load_causal_lm(base_name, quantization=quantization, dtype=torch.float32, cache_dir=cache_dir)
    base = loaded.model
    if quantization != "none":
        base = base.dequantize()
    tok = loaded.tokenizer
    probe = tok("The quick brown fox explains why the sky is blue.", return_tensors="pt")
    try:
        model = PeftModel.from_pretrained(base, str(adapter))
    except (RuntimeError, ValueError, KeyError) as exc:
        trained_on = _adapter_base(adapter)
        raise ValueError(
            f"adapter {adapter} does not fit the base model {base_name!r} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:160]}); it was trained on {trained_on!r}: pass --base_model with "
            "that model, or leave --base_model out"
        ) from None
    model.eval()
    with torch.no_grad():
        ref = model(**probe).logits
        merged = model.merge_and_unload()
        got = merged(**probe).logits
    diff = float((ref - got).abs().max())
    print(f"max |logit(merged) - logit(base + adapter)| = {diff:.3e} (tolerance {tolerance:g})")
    if diff > tolerance:
        raise ValueError(f"merged logits differ by {diff:.3e} > tolerance {tolerance:g}; not writing {target or 'anything'}")
    if getattr(merged, "hf_quantizer", None) is not None:
        merged.hf_quantizer.remove_quantization_config(merged)
    return merged, tok


def merge(
    adapter: Path,
    output: Path,
    base_model: Optional[str] = None,
    quantization: str = "auto",
    tolerance: float = 1e-3,
    cache_dir: Optional[Path] = None,
    overwrite: bool = False,
) -> int:
    """Merge a LoRA/GRIT adapter into its base and save a full Hugging Face model folder.

    The adapter was trained against the base as the model saw it; for a QLoRA adapter that is the
    4-bit base, which is dequantised (``model.dequantize()``) before merging so the merged weights
    equal what training used. Logits of the merged model are compared with base + adapter on a probe
    prompt; the command fails (and writes nothing) if they differ by more than ``tolerance``.

    Args:
        adapter: PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
        output: folder for the merged model (written atomically).
        base_model: base model; default: the adapter's base_model_name_or_path.
        quantization: base quantisation during training: 'auto' (read fteval_run.json), 'nf4', 'fp4', 'none'.
        tolerance: maximum allowed |merged - adapter| logit difference.
        cache_dir: embedded-model cache.
        overwrite: write into an existing non-empty ``output`` folder, replacing what an earlier
            fteval write left there; files fteval did not write are kept, and a file of the user's that
            has the name of one the merge writes stops the command (nothing is changed). Without it such
            a folder is refused before any work.
    """
    adapter, output = Path(adapter), Path(output)
    check_writable_directory(output, overwrite)
    merged, tok = merged_model(adapter, base_model, quantization, tolerance, cache_dir, target=output)
    with atomic_directory(output, overwrite=overwrite, keep_foreign=True) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"merged model written to {output}")
    return 0
