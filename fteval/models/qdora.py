"""QDoRAModule: peft DoRA adapters (fp32) on a bitsandbytes 4-bit base.

DoRA (Liu et al. 2024, arXiv 2402.09353) splits each adapted weight into a magnitude vector and a
direction: the LoRA update ``B A`` moves the direction, and a trainable per-output-row magnitude
``m`` rescales the column-normalised result, ``W' = m * (W + s B A) / ||W + s B A||``. On a 4-bit
base this is QDoRA. It is peft's ``LoraConfig(use_dora=True)``: the module is :class:`QLoRAModule`
with that one option, so loading, training, checkpoints and the PEFT export are QLoRA's (the
export also holds each layer's ``lora_magnitude_vector``, which ``PeftModel.from_pretrained`` reads).
"""

from __future__ import annotations

from fteval.methods import QDORA
from fteval.models.qlora import QLoRAModule


class QDoRAModule(QLoRAModule):
    """QDoRA fine-tuning: 4-bit NF4 base + DoRA (r=16, alpha=32, dropout 0.05 on all 7 projections by default).

    Takes the arguments of :class:`fteval.models.base.AdapterModule`; ``quantization: none`` gives
    DoRA on a full-precision base. DoRA's magnitude normalisation costs one extra pass over each
    adapted weight per forward, so a step is slower than QLoRA's.
    """

    method_name = QDORA.name
    lora_options = {"use_dora": True}
