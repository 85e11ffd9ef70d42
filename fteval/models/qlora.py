"""QLoRAModule: peft LoRA adapters (fp32) on a bitsandbytes 4-bit base (Dettmers et al. 2023, arXiv 2305.14314).

The base is quantised by transformers' ``BitsAndBytesConfig`` when it is loaded, not by
Lightning's ``BitsandbytesPrecision`` plugin, which would quantise the adapters too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fteval.io import atomic_directory
from fteval.methods import QLORA
from fteval.models.base import AdapterModule


class QLoRAModule(AdapterModule):
    """QLoRA fine-tuning: 4-bit NF4 base + LoRA (r=16, alpha=32, dropout 0.05 on all 7 projections by default).

    Takes the arguments of :class:`fteval.models.base.AdapterModule`.
    """

    method_name = QLORA.name
    #: extra ``peft.LoraConfig`` arguments of a method built on this one (QDoRA: ``use_dora``)
    lora_options: dict = {}

    def attach_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        from peft import LoraConfig, get_peft_model

        hp = self.hparams
        config = LoraConfig(
            r=hp.r,
            lora_alpha=hp.alpha,
            lora_dropout=hp.dropout,
            target_modules=list(hp.target_modules),
            use_rslora=hp.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            **self.lora_options,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")})
            raise ValueError(
                f"target_modules {list(hp.target_modules)} match no layer of {hp.model_name_or_path}; "
                f"its linear layers are named {names}"
            ) from exc
        # Adapters train in fp32 whatever the base compute dtype (no fp16 adapters under a GradScaler).
        for name, p in peft_model.named_parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        return peft_model

    def export_adapter(self, output_dir: Path) -> Path:
        """Standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors), written atomically."""
        output_dir = Path(output_dir)
        with atomic_directory(output_dir) as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            cfg = tmp / "adapter_config.json"
            # Record the user-facing base name, not the cache folder it was materialised into.
            data = json.loads(cfg.read_text())
            data["base_model_name_or_path"] = self.hparams.model_name_or_path
            cfg.write_text(json.dumps(data, indent=2))
        return output_dir
