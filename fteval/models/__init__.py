"""Models: loading (hub id | local folder | embedded GGUF), QLoRA and GRIT LightningModules, adapters."""

from fteval.models.grit import GRITModule
from fteval.models.qlora import QLoRAModule

__all__ = ["GRITModule", "QLoRAModule"]
