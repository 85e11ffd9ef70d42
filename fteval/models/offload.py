"""Activation offload: tensors saved for backward live in pinned host memory until backward needs them.

With gradient checkpointing, what a transformer keeps between forward and backward is each
block's input (``[batch, seq, hidden]`` per layer; 32 x 256 MiB at Llama-3-8B, batch 4 x 8192,
bf16) plus whatever runs outside the checkpointed blocks. Inside :func:`offload_activations`
every such tensor on an accelerator that is at least ``min_bytes`` large (and is not a parameter)
is copied to pinned host memory on a side stream as soon as it is saved, and copied back on the
compute stream when backward unpacks it. Recomputation inside checkpointed blocks happens during
backward, outside the context, so recomputed tensors stay on the device (they are short-lived).

Built on torch's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) because
``torch.autograd.graph.save_on_cpu`` copies synchronously and would also move the frozen 4-bit
weights that bitsandbytes saves for backward. The device-to-host copies overlap with compute;
the host-to-device copies in backward are issued when needed (no prefetch), so a step is slower
by the part of those copies that the PCIe link cannot hide.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["offload_activations"]


class _Offloader:
    def __init__(self, min_bytes: int, force_cpu: bool) -> None:
        self.min_bytes = min_bytes
        self.force_cpu = force_cpu  # tests: "offload" CPU tensors too (a copy), to exercise the hooks
        self.stream = None
        self.offloaded_bytes = 0

    def _wanted(self, t: Tensor) -> bool:
        if isinstance(t, nn.Parameter) or t.numel() * t.element_size() < self.min_bytes:
            return False
        return t.device.type == "cuda" or (self.force_cpu and t.device.type == "cpu")

    def pack(self, t: Tensor):
        if not self._wanted(t):
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        if t.device.type != "cuda":
            return (t.detach().clone(), t.device, None)
        if self.stream is None:
            self.stream = torch.cuda.Stream(t.device)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
        with torch.cuda.stream(self.stream):
            host = torch.empty_like(t, device="cpu", pin_memory=True)
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its device memory is reused only after the copy finished
        return (host, t.device, self.stream.record_event())

    @staticmethod
    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        host, device, event = packed
        if event is None:
            return host.to(device)
        torch.cuda.current_stream(device).wait_event(event)
        return host.to(device, non_blocking=True)


@contextlib.contextmanager
def offload_activations(enabled: bool = True, min_bytes: int = 1 << 20, force_cpu: bool = False) -> Iterator[_Offloader]:
    """Within the context, tensors saved for backward go to pinned host memory (see the module docstring).

    Args:
        enabled: False makes the context a no-op (so callers need no branch).
        min_bytes: smaller tensors stay where they are (their copies would cost more than they save).
        force_cpu: also "offload" CPU tensors (a copy): for tests on machines without a GPU.
    """
    off = _Offloader(min_bytes, force_cpu)
    if not enabled:
        yield off
        return
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        yield off
