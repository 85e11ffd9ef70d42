"""Evaluation forwards of a frozen 4-bit base on the CPU with each weight dequantised once, not at every call.

bitsandbytes runs a no-grad forward of a CPU ``Linear4bit`` (with the CPU inference repacking off, as
:func:`fteval.models.loading.disable_cpu_inference_repacking` sets it) as: dequantise the nested absmax,
dequantise the 4-bit weight to the compute dtype, dense ``linear``. It does so at every call, and
generation calls every layer once per new token. :func:`dense_4bit_inference` makes each such layer
keep the dequantised weight of its first no-grad call and run the same dense ``linear`` on it
afterwards: the weight comes from the same bitsandbytes kernels with the same arguments, so every
output is bitwise the one bitsandbytes computes (``tests/models/test_dense4bit.py``). The cost is the
dense weights' memory (4 bytes per parameter in fp32), so it is for a frozen base on the CPU only;
CUDA layers and layouts other than the one above take bitsandbytes' own path unchanged.

Forwards that need gradients (LoRA training: the base is frozen, its input carries gradients) take
bitsandbytes' path unless the block is entered with ``grad=True``, as a fit does (``fit_start`` in
``fteval.models.base``): bitsandbytes' ``MatMul4Bit`` then dequantises the weight in the forward and
again in every backward; :class:`_DenseMatMul4bit` is the same function on the kept weight (forward
``linear(x, W, bias)``, backward ``grad_output @ W``), so outputs and input gradients stay bitwise
bitsandbytes' (``tests/models/test_dense4bit.py``). Written here: bitsandbytes keeps no dequantised
copy itself.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import nn

__all__ = ["dense_4bit_inference", "dense_4bit_layers", "dense_bytes", "fits_in_memory"]

_CACHE = "_fteval_dense_weight"  # attribute holding {dtype: dense weight [out, in]} on a switched layer
_GRAD = "_fteval_dense_grad"  # attribute set on a switched layer whose forwards with gradients use the kept weight


def dense_4bit_layers(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes ``Linear4bit`` layers of ``model`` whose weights live on the CPU."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and m.weight.device.type == "cpu"]


def dense_bytes(model: nn.Module) -> int:
    """Bytes the dequantised weights of :func:`dense_4bit_layers` take in their compute dtype (fp32 when unset)."""
    total = 0
    for layer in dense_4bit_layers(model):
        dtype = layer.compute_dtype or torch.float32
        total += int(torch.Size(layer.weight.quant_state.shape).numel()) * dtype.itemsize
    return total


def fits_in_memory(model: nn.Module, fraction: float = 0.5) -> bool:
    """Whether ``model`` has CPU 4-bit layers whose dequantised weights take at most ``fraction`` of the memory
    available now (psutil)."""
    import psutil

    need = dense_bytes(model)
    return 0 < need <= fraction * psutil.virtual_memory().available


def _dense_weight(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The weight as bitsandbytes' no-grad path dequantises it for an input of ``dtype`` (its ops, its arguments)."""
    qs = layer.weight.quant_state
    packed = layer.weight.data.view(-1, 1)
    absmax = qs.absmax
    if qs.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qs.absmax, qs.state2.absmax, qs.state2.code, 256, torch.float32) + qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(packed, absmax, qs.blocksize, qs.quant_type, qs.shape, dtype)


class _DenseMatMul4bit(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit`` (forward ``linear``, backward ``grad_output @ W`` for the input) on a weight
    dequantised beforehand; the weight gets no gradient (a frozen base)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.grad_weight = grad_weight if grad_weight is not None else weight
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        w = ctx.grad_weight
        return torch.matmul(grad_output, w.to(grad_output.dtype)), None, None, None


def _cached(layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    cache = getattr(layer, _CACHE)
    if dtype not in cache:
        cache[dtype] = _dense_weight(layer, dtype)  # [out, in]
    return cache[dtype]


def _dense_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    qs = self.weight.quant_state
    bias = self.bias
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    plain_layout = (x.numel() > 0 and not getattr(qs, "packing_format_for_cpu", False)
                    and not (self.support_avx512bf16_for_cpu and not self.training)
                    and (not qs.nested or qs.state2.blocksize == 256)
                    and len(qs.shape) == 2 and not (x.shape[-1] == qs.shape[0] and x.shape[-1] != qs.shape[1]))
    grad_path = needs_grad and getattr(self, _GRAD, False) and (bias is None or not bias.requires_grad)
    if (needs_grad and not grad_path) or not plain_layout:
        return type(self).forward(self, x)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(self.compute_dtype)
    weight = _cached(self, x.dtype)
    if not grad_path:
        return torch.nn.functional.linear(x, weight, bias).to(inp_dtype)
    # bitsandbytes' backward dequantises to the weight's own dtype and casts to the gradient's
    grad_weight = None if qs.dtype == x.dtype else _cached(self, qs.dtype)
    return _DenseMatMul4bit.apply(x, weight, bias, grad_weight).to(inp_dtype)


@contextmanager
def dense_4bit_inference(model: nn.Module, grad: bool = False) -> Iterator[int]:
    """Inside the block, no-grad forwards of ``model``'s CPU ``Linear4bit`` layers reuse one dequantised weight
    per layer (module docstring), and with ``grad`` so do forwards and backwards that need input gradients;
    yields how many layers were switched. The weights must not change inside the block (a frozen base). On
    leaving, the layers forward through bitsandbytes again and the copies are freed."""
    layers = dense_4bit_layers(model)
    for layer in layers:
        setattr(layer, _CACHE, {})
        setattr(layer, _GRAD, grad)
        layer.forward = types.MethodType(_dense_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            if "forward" in layer.__dict__:
                del layer.forward
            layer.__dict__.pop(_CACHE, None)
            layer.__dict__.pop(_GRAD, None)
