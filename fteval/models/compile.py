"""Regional compilation: ``torch.compile`` on every transformer block of a model (``compile_blocks``).

The blocks of a decoder are identical, so one compiled graph serves all of them and the first
step pays one compile, not one per block. :func:`compile_blocks` is what
:class:`fteval.models.engine.TrainingEngine` applies after the adapters are attached; ``fteval bench
train`` compiles its plain reference loop with the same function.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import torch

__all__ = ["compile_blocks", "transformer_blocks"]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a transformers model (or a peft model around one).

    The block classes are the model's ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``), the
    classes transformers itself treats as units when it shards a model.
    """
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    # Only the outermost matches (a block class nested in another block is compiled with it).
    inside = {id(c) for b in blocks for c in b.modules() if c is not b}
    return [b for b in blocks if id(b) not in inside]


def _check_compiler(model: torch.nn.Module) -> None:
    """Fail before training when inductor's code generator for the model's device is missing."""
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    if device == "cuda" and importlib.util.find_spec("triton") is None:
        raise ValueError(
            "compile_blocks: torch.compile on a CUDA device needs Triton, which is not installed; "
            "pip install triton (it ships with PyTorch's CUDA wheels) or set compile_blocks: false."
        )
    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        raise ValueError(
            "compile_blocks: torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
            "install one (e.g. apt-get install g++) or set compile_blocks: false."
        )


def compile_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``torch.compile`` every transformer block of ``model`` in place (``nn.Module.compile``: parameter
    names and ``state_dict`` keys are unchanged). Returns the blocks.

    Raises ValueError when the model declares no blocks (no ``_no_split_modules``) or when the
    compiler toolchain for its device is missing (Triton on CUDA, a C++ compiler on the CPU).
    """
    _check_compiler(model)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(
            f"compile_blocks: {type(model).__name__} declares no transformer blocks (_no_split_modules is empty); "
            "set compile_blocks: false for this model."
        )
    for block in blocks:
        for m in block.modules():  # GRIT layers hand their K-FAC statistics over differently when compiled
            if hasattr(m, "in_compiled_block"):
                m.in_compiled_block = True
        block.compile()
    return blocks
