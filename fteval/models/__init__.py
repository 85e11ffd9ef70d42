"""Models: loading (hub id | local folder | embedded GGUF), the methods' LightningModules, adapters.

The methods and what each one is are listed in :mod:`fteval.methods`.
"""

from fteval.models.grit import GRITModule
from fteval.models.lora import LoRAModule
from fteval.models.qdora import QDoRAModule
from fteval.models.qlora import QLoRAModule

__all__ = ["GRITModule", "LoRAModule", "QDoRAModule", "QLoRAModule"]
