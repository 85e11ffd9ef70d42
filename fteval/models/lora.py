"""LoRAModule: peft LoRA adapters on a full-precision base (Hu et al. 2021, arXiv 2106.09685).

The base is loaded unquantised: bf16 on a GPU that supports it, fp32 otherwise (the CPU). The
adapters, training step, checkpoints and PEFT export are :class:`QLoRAModule`'s; only the base
differs, so comparing the two measures what the 4-bit base costs.
"""

from __future__ import annotations

from typing import Any

from fteval.methods import LORA
from fteval.models.loading import Quantization
from fteval.models.qlora import QLoRAModule


class LoRAModule(QLoRAModule):
    """Plain LoRA fine-tuning: unquantised base + LoRA (r=16, alpha=32, dropout 0.05 on all 7 projections by default).

    Takes the arguments of :class:`fteval.models.base.AdapterModule`; ``quantization`` must stay
    ``'none'`` (a 4-bit base is :class:`QLoRAModule`).
    """

    method_name = LORA.name

    def __init__(self, *args: Any, quantization: Quantization = "none", **kwargs: Any):
        if quantization != "none":
            raise ValueError(f"LoRAModule: quantization={quantization!r}, but plain LoRA trains on a full-precision "
                             "base; set quantization: none, or use fteval.models.QLoRAModule for a 4-bit base")
        super().__init__(*args, quantization=quantization, **kwargs)
