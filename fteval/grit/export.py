"""GRIT's adapter and statistics written to disk: a standard peft LoRA folder, and the K-FAC factors
with their eigenbases and the effective rank per layer beside it.

peft, vLLM and merge tools load a GRIT adapter exactly like a QLoRA one. Both writers go through a
temporary sibling folder, so a failure leaves the target as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fteval.grit.layer import GritLoraLinear, _check_hparams, grit_layers
from fteval.io import atomic_files
from fteval.grit.reprojection import energy_rank

__all__ = ["adapter_rank", "export_grit_adapter", "save_kfac_artifacts"]


def _truncate(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-k factors of B @ A (Eckart-Young) from r x r work: A ``[r, in]``, B ``[out, r]``.

    B A = Q_B (R_B R_A^T) Q_A^T with thin QRs of B and A^T; the SVD of the r x r core
    gives B' = Q_B U_k sqrt(S_k) ``[out, k]`` and A' = sqrt(S_k) V_k^T Q_A^T ``[k, in]``.
    """
    Qb, Rb = torch.linalg.qr(B.double())  # [out, r], [r, r]
    Qa, Ra = torch.linalg.qr(A.double().T)  # [in, r], [r, r]
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    root = S[:k].sqrt()
    B_k = Qb @ (U[:, :k] * root)  # [out, k]
    A_k = (root[:, None] * Vh[:k]) @ Qa.T  # [k, in]
    return A_k.to(A.dtype), B_k.to(B.dtype)


def adapter_rank(A: torch.Tensor, B: torch.Tensor, rtol: float = 1e-5) -> int:
    """Numerical rank of B @ A ``[out, in]`` from its r x r core (see :func:`_truncate`)."""
    _, Rb = torch.linalg.qr(B.double())
    _, Ra = torch.linalg.qr(A.double().T)
    s = torch.linalg.svdvals(Rb @ Ra.T)
    return int((s > rtol * s.max()).sum()) if s.numel() and float(s.max()) > 0 else 0


def export_grit_adapter(
    model: nn.Module,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str,
    target_modules: Sequence[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool = False,
    truncate_to_effective_rank: Mapping[str, int] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Path:
    """Write GRIT's adapter as a standard peft LoRA folder: adapter_config.json + adapter_model.safetensors.

    ``model`` is the transformers model the layers were injected into (not a wrapper
    around it): its module paths become peft's keys
    ``base_model.model.<path>.lora_A.weight`` / ``.lora_B.weight``, so
    ``PeftModel.from_pretrained(base, output_dir)`` reproduces the GRIT model.
    ``truncate_to_effective_rank`` ``{module path: k}`` stores the best rank-k factors of
    B A for those layers (exact when B A has rank <= k, e.g. after one-sided reprojection
    to k) and records them in peft's ``rank_pattern``, with ``alpha_pattern`` set so the
    scaling stays ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). Tensors keep the
    adapter dtype. Returns the folder.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    _check_hparams(r, alpha, dropout)
    layers = grit_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no GRIT layers: pass the transformers model that "
            "inject_grit_layers modified."
        )
    for name, layer in layers.items():
        if layer.r != r or not math.isclose(layer.alpha, float(alpha)) or layer.use_rslora != bool(use_rslora):
            raise ValueError(
                f"GRIT layer {name} has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora} but export was "
                f"asked for r={r}, alpha={alpha}, use_rslora={use_rslora}; pass the values the layers were built with."
            )
    truncate = dict(truncate_to_effective_rank or {})
    unknown = sorted(set(truncate) - set(layers))
    if unknown:
        raise ValueError(
            f"truncate_to_effective_rank names unknown GRIT layers {unknown[:5]}; known: {list(layers)[:5]}..."
        )
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers.items():
        A = layer.lora_A.weight.detach()
        B = layer.lora_B.weight.detach()
        if name in truncate:
            k = truncate[name]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= r:
                raise ValueError(f"truncate_to_effective_rank[{name!r}] must be an int in [1, {r}], got {k!r}.")
            if k < r:
                A, B = _truncate(A, B, k)
                key = re.escape(name)  # peft matches pattern keys as regexes against module paths
                rank_pattern[key] = k
                alpha_pattern[key] = float(alpha) * (math.sqrt(k / r) if use_rslora else k / r)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(target_modules),
        use_rslora=bool(use_rslora),
        bias="none",
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
    )

    with atomic_files(Path(output_dir)) as tmp:  # a failure leaves output_dir as it was
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(output_dir)


def save_kfac_artifacts(
    layers: Mapping[str, GritLoraLinear],
    output_dir: str | os.PathLike,
    effective_ranks: Mapping[str, int] | None = None,
    energy_threshold: float = 0.9,
) -> Path:
    """Write ``kfac_factors.safetensors`` and ``effective_rank.json`` for GRIT layers with statistics.

    Tensors per layer path ``<name>``: ``<name>.S_a``, ``<name>.S_g`` ``[r, r]`` (fp32
    factors), ``<name>.eigvals_a``/``_g`` ``[r]`` (descending) and ``<name>.eigvecs_a``/``_g``
    ``[r, r]`` (columns, same order). effective_rank.json per layer: ``r``,
    ``effective_rank`` (from ``effective_ranks``, e.g. :func:`fteval.grit.reprojection.kept_ranks`,
    else the energy rank), ``energy_rank`` (smallest k holding ``energy_threshold`` of S_a's trace),
    ``adapter_rank`` (numerical rank of B A), token counts ``n_a``/``n_g``.
    """
    from safetensors.torch import save_file

    if not 0.0 < energy_threshold <= 1.0:
        raise ValueError(f"energy_threshold must be in (0, 1], got {energy_threshold!r}.")
    with_stats = {name: layer for name, layer in layers.items() if layer.stats is not None}
    if not with_stats:
        raise ValueError(
            "No GRIT layer has K-FAC statistics: attach a fteval.grit.KFAC (GRITModule does so when fitting) and train before saving artifacts."
        )
    tensors: dict[str, torch.Tensor] = {}
    report: dict[str, dict[str, Any]] = {}
    for name, layer in with_stats.items():
        st = layer.stats
        assert st is not None
        entry: dict[str, Any] = {"r": layer.r, "n_a": st.n_a, "n_g": st.n_g}
        for side in ("a", "g"):
            S = getattr(st, f"S_{side}").detach().float().cpu()
            ev, V = torch.linalg.eigh(S)  # ascending
            tensors[f"{name}.S_{side}"] = S.contiguous()
            tensors[f"{name}.eigvals_{side}"] = ev.flip(0).contiguous()
            tensors[f"{name}.eigvecs_{side}"] = V.flip(1).contiguous()
            if side == "a":
                entry["energy_rank"] = energy_rank(ev, energy_threshold, 1, layer.r)
        given = effective_ranks is not None and name in effective_ranks
        entry["effective_rank"] = int(effective_ranks[name]) if given else entry["energy_rank"]
        entry["adapter_rank"] = adapter_rank(layer.lora_A.weight.detach().cpu(), layer.lora_B.weight.detach().cpu())
        report[name] = entry
    summary = {
        "energy_threshold": energy_threshold,
        "effective_rank_source": "reprojection" if effective_ranks else "energy",
        "mean_effective_rank": sum(e["effective_rank"] for e in report.values()) / len(report),
        "mean_adapter_rank": sum(e["adapter_rank"] for e in report.values()) / len(report),
        "layers": report,
    }

    with atomic_files(Path(output_dir)) as tmp:
        save_file(tensors, str(tmp / "kfac_factors.safetensors"), metadata={"format": "pt"})
        (tmp / "effective_rank.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Path(output_dir)
