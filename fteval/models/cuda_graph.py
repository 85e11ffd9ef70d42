"""Training micro-batches (forward and backward) replayed from CUDA graphs.

At small batches a training step is host time: Python and kernel launches for every layer of
forward, gradient checkpointing's recompute and backward, while the GPU waits (BENCHMARKS.md, "What
dominates a step"). A CUDA graph records a micro-batch's kernels once and replays them with one
launch. :class:`MicroBatchGraphs` does that for whole micro-batches (``AdapterModule(cuda_graph=True)``
and ``fteval bench train --cuda_graph``):

* the caller's ``fn(batch)`` runs forward *and* backward and returns the loss; in a Lightning
  fit it runs inside ``training_step`` (the module skips Lightning's own backward);
* a batch *signature* (names, shapes and dtypes of its tensors, its other values) runs eagerly
  ``warmup`` times (compilation, autotuning and lazily built caches happen there), is then
  captured once into a graph with static input buffers, and every later micro-batch of that
  signature is copied into the buffers and replays the graph. At most ``max_graphs``
  signatures are captured (one memory pool for all); others run eagerly;
* gradients accumulate into the trainable parameters' ``.grad`` tensors, which exist before
  the first capture and keep their storage (they are zeroed in place, never set to None);
* anything ``fn`` does on the device happens at every replay; its Python runs only while
  capturing. Work that must follow each micro-batch (GRIT's K-FAC statistics) is therefore
  done inside ``fn`` on device tensors that outlive the graph.

Random numbers inside the graph (dropout) come from the default CUDA generator, whose Philox
offset each replay advances (PyTorch's graph-safe RNG). Gradient checkpointing must redraw the
forward's numbers in its recompute; ``torch.utils.checkpoint`` saves and restores the
generator's state on the host, which capture forbids. :func:`graph_safe_checkpointing` gives each
checkpointed block two generator states, one for its forward and one for its recompute, seeded
alike and advanced alike, that every graph registers (the scheme inductor uses for its own
graphs, here per checkpointed block).

Hand-written: PyTorch has the capture primitive (``torch.cuda.CUDAGraph``) and
``torch.cuda.make_graphed_callables`` (per module, not for a forward + backward + statistics
step with checkpointing), but no training-step graph cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["MicroBatchGraphs", "graph_safe_checkpointing", "graphable_batch"]

GRAPH_KEYS = ("input_ids", "labels", "attention_mask")  # what a graphed micro-batch may carry


def graphable_batch(batch: Any) -> Optional[dict]:
    """The batch as a graph can take it, or None when it must run eagerly.

    A graphed forward may not read device values on the host, and must take the same code path
    while captured as in its eager warm-up runs. transformers chooses its attention mask by
    reading the 2D ``attention_mask`` (no padding: SDPA's causal kernel without a mask) or the
    ``position_ids`` (packed sequences), except while a stream is being captured, when it builds
    a mask instead. So batches of ``input_ids``, ``labels`` and a 2D ``attention_mask`` (or none)
    qualify, and they carry their mask as a 4D boolean tensor ``[batch, 1, seq, seq]`` (True:
    attend) built on the device, which transformers hands to SDPA as it is, in warm-up and
    capture alike: causal, padding keys masked, and every position attending at least to itself
    (so a padding row of a left-padded batch has no empty softmax; real tokens are unaffected).
    Padding-free batches (``position_ids``) run eagerly.
    """
    if not isinstance(batch, Mapping) or not isinstance(batch.get("input_ids"), torch.Tensor):
        return None
    if any(k not in GRAPH_KEYS for k in batch):
        return None
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if ids.dim() != 2 or (isinstance(mask, torch.Tensor) and tuple(mask.shape) != tuple(ids.shape)):
        return None
    b, n = ids.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()  # [seq, seq]
    if isinstance(mask, torch.Tensor):
        eye = torch.eye(n, dtype=torch.bool, device=ids.device)
        full = (causal & mask.bool()[:, None, None, :]) | eye  # [batch, 1, seq, seq]
    else:
        full = causal.expand(b, 1, n, n)  # [batch, 1, seq, seq], a broadcast view
    return {**{k: v for k, v in batch.items() if k != "attention_mask"}, "attention_mask": full}


def _is_causal_mask(name: str, value: Any) -> bool:
    """The broadcast causal mask of an unpadded batch: a function of the shape alone, never copied."""
    return name == "attention_mask" and isinstance(value, torch.Tensor) and value.dim() == 4 and value.stride(0) == 0


@dataclass
class _Captured:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, Any]  # static input buffers (and the signature's non-tensor values)
    loss: torch.Tensor  # the graph's output, overwritten at each replay


def _signature(batch: Mapping) -> Optional[tuple]:
    parts = []
    for k in sorted(batch):
        v = batch[k]
        if isinstance(v, torch.Tensor):
            parts.append((k, tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
            except TypeError:
                return None
            parts.append((k, v))
    return tuple(parts)


class MicroBatchGraphs:
    """Forward + backward of training micro-batches, replayed from one CUDA graph per batch signature.

    Args:
        fn: ``fn(batch) -> loss``: forward, ``backward()`` and any per-micro-batch work; the
            returned 0-dim tensor is the micro-batch's loss.
        params: the trainable parameters (their ``.grad`` is where backward accumulates).
        warmup: eager runs of a signature before it is captured (>= 1: the first run compiles,
            autotunes and fills caches, none of which may happen during capture).
        max_graphs: signatures captured at most; later new ones run eagerly.
        checkpointing: what :func:`graph_safe_checkpointing` installed on the model (its
            generator states are registered with every graph and re-aligned before every
            micro-batch), or None without gradient checkpointing.
        capture: False runs every micro-batch eagerly through the same static buffers and
            gradient handling (for tests on machines without CUDA).
    """

    def __init__(
        self,
        fn: Callable[[dict], torch.Tensor],
        params: Iterable[nn.Parameter],
        warmup: int = 2,
        max_graphs: int = 16,
        checkpointing: Optional["GraphSafeCheckpointing"] = None,
        capture: bool = True,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"cuda_graph warmup={warmup} must be >= 1 (the first run compiles and fills caches)")
        if max_graphs < 1:
            raise ValueError(f"cuda_graph max_graphs={max_graphs} must be >= 1")
        self.fn = fn
        self.params = list(params)
        self.warmup, self.max_graphs, self.capture = int(warmup), int(max_graphs), bool(capture)
        self.checkpointing = checkpointing
        self.grads: Optional[list[torch.Tensor]] = None  # the .grad tensors the graphs write into
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: Counter = Counter()
        self.pool = None
        self.counts = Counter()  # "eager", "captured", "replayed"
        self._warned_full = False
        self.unbound = False  # unbind_grads took the gradients off the parameters

    # ------------------------------------------------------------------ gradients
    def _bind_grads(self) -> list[torch.Tensor]:
        """Every parameter's ``.grad`` is one of the tensors the graphs write into (made on first use)."""
        if self.grads is None:
            self.grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:  # someone replaced or dropped it: keep its value, restore the storage
                if p.grad is None:
                    g.zero_()
                else:
                    g.copy_(p.grad)
                p.grad = g
        return self.grads

    def zero_grads(self) -> None:
        """Zero the gradients in place (what ``optimizer.zero_grad`` must do while graphs exist)."""
        grads = self._bind_grads()
        if grads:
            torch._foreach_zero_(grads)

    def unbind_grads(self) -> None:
        """Take the gradient tensors off the parameters (``.grad`` None), values kept in the graphs' tensors.

        An ``optimizer.zero_grad()`` that follows (set to None or in place) then leaves the micro-batch's
        gradients alone; :meth:`rebind_grads` puts them back.
        """
        self._bind_grads()
        for p in self.params:
            p.grad = None
        self.unbound = True

    def rebind_grads(self) -> None:
        """Undo :meth:`unbind_grads`: every parameter's ``.grad`` is its graph tensor again, values as they were."""
        if self.unbound and self.grads is not None:
            for p, g in zip(self.params, self.grads):
                p.grad = g
        self.unbound = False

    # ------------------------------------------------------------------ running
    def step(self, batch: Mapping, zero_grads: bool = True) -> torch.Tensor:
        """One training micro-batch: zero the gradients first (``zero_grads``: the first micro-batch of
        an accumulation window), then :meth:`run` on :func:`graphable_batch` of ``batch``, or ``fn``
        eagerly on ``batch`` itself when a graph cannot take it (counted as ``eager_unsupported``)."""
        self.rebind_grads()  # a step after unbind_grads without rebind_grads: the gradients as they were
        if zero_grads:
            self.zero_grads()
        else:
            self._bind_grads()
        if self.checkpointing is not None:
            self.checkpointing.align()
        graphable = graphable_batch(batch)
        if graphable is None:
            self.counts["eager_unsupported"] += 1
            return self.fn(batch).detach()
        return self._run(graphable)

    def run(self, batch: Mapping) -> torch.Tensor:
        """Run ``fn`` on ``batch`` (eagerly, by capture or by replay); returns the loss (a fresh tensor)."""
        self._bind_grads()
        return self._run(batch)

    def _run(self, batch: Mapping) -> torch.Tensor:
        key = _signature(batch)
        captured = self.graphs.get(key) if key is not None else None
        if captured is not None:
            for k, buf in captured.inputs.items():
                if isinstance(buf, torch.Tensor) and not _is_causal_mask(k, buf):
                    buf.copy_(batch[k], non_blocking=True)
            if self.capture:
                captured.graph.replay()
            else:
                captured.loss = self.fn(captured.inputs).detach()
            self.counts["replayed"] += 1
            return captured.loss.clone()
        if key is None or self.seen[key] < self.warmup or len(self.graphs) >= self.max_graphs:
            if key is not None:
                self.seen[key] += 1
                if len(self.graphs) >= self.max_graphs and not self._warned_full:
                    log.warning("cuda_graph: %d batch shapes captured (max_graphs); further new shapes run eagerly",
                                self.max_graphs)
                    self._warned_full = True
            self.counts["eager"] += 1
            return self.fn(dict(batch)).detach()
        captured = self._capture(key, batch)
        self.counts["captured"] += 1
        return captured.loss.clone()

    def _capture(self, key: tuple, batch: Mapping) -> _Captured:
        # an unpadded batch's 4D causal mask depends on the shape alone: kept as it is (a broadcast view)
        inputs = {k: (v.clone() if isinstance(v, torch.Tensor) and not _is_causal_mask(k, v) else v)
                  for k, v in batch.items()}
        if not self.capture:
            captured = _Captured(None, inputs, self.fn(inputs).detach())
            self.graphs[key] = captured
            return captured
        device = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).device
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        for state in self.checkpointing.generator_states if self.checkpointing is not None else ():
            graph.register_generator_state(state)
        # Casts cached by autocast before the capture would be read by the graph but not made by it.
        torch.clear_autocast_cache()
        first: list[BaseException] = []
        try:
            # a compile during capture (a recompile of a block) cannot work: make it an error at once
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), \
                    torch.compiler.set_stance("fail_on_recompile"):
                try:
                    loss = self.fn(inputs).detach()
                except BaseException as exc:  # the cause; ending the capture then raises a generic error
                    first.append(exc)
                    raise
        except Exception as exc:
            cause = first[0] if first else exc
            raise RuntimeError(
                f"cuda_graph: capturing the training step failed ({type(cause).__name__}: "
                f"{str(cause).strip().splitlines()[-1][:300]}). Something in the step synchronises with the host, "
                "compiles or allocates host memory; set cuda_graph: false for this model/config."
            ) from cause
        self.pool = graph.pool()
        graph.replay()  # capture only recorded the kernels: run this micro-batch
        captured = self.graphs[key] = _Captured(graph, inputs, loss)
        return captured


# ----------------------------------------------------------------------------------------------
# gradient checkpointing inside graphs
# ----------------------------------------------------------------------------------------------


class _BlockRng:
    """A checkpointed block's random stream: one state for its forward, one for its recompute.

    Both start from the same seed and draw the same amounts (one forward and one recompute per
    micro-batch), so the recompute redraws the forward's dropout masks without reading the
    generator on the host. :meth:`align` re-synchronises them before each micro-batch (a forward
    without a backward, e.g. an interrupted step, would otherwise shift one against the other).
    """

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.forward_state = gen.clone_state()
        self.recompute_state = gen.clone_state()

    @contextlib.contextmanager
    def _drawing_from(self, state: Any):
        default = torch.cuda.default_generators[self.device.index if self.device.index is not None else 0]
        previous = default.graphsafe_get_state()
        default.graphsafe_set_state(state)
        try:
            yield
        finally:
            default.graphsafe_set_state(previous)

    def contexts(self):
        return self._drawing_from(self.forward_state), self._drawing_from(self.recompute_state)

    def align(self) -> None:
        self.recompute_state.set_offset(self.forward_state.get_offset())

    def __call__(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        kwargs.pop("use_reentrant", None)
        kwargs.pop("preserve_rng_state", None)
        return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, context_fn=self.contexts,
                          **kwargs)


class GraphSafeCheckpointing:
    """What :func:`graph_safe_checkpointing` installed: the blocks' generator states, their re-alignment,
    and :meth:`restore` (the blocks' previous checkpoint functions back)."""

    def __init__(self, streams: list[_BlockRng], previous: list[tuple[nn.Module, Any]] = ()) -> None:
        self.streams = streams
        self.previous = list(previous)

    def restore(self) -> None:
        for module, function in self.previous:
            module._gradient_checkpointing_func = function
        self.previous = []

    @property
    def generator_states(self) -> list[Any]:
        return [s for rng in self.streams for s in (rng.forward_state, rng.recompute_state)]

    def align(self) -> None:
        for rng in self.streams:
            rng.align()


def graph_safe_checkpointing(model: nn.Module, seed: Optional[int] = None) -> GraphSafeCheckpointing:
    """Give every checkpointed transformers block of ``model`` (on CUDA) a graph-safe checkpoint function.

    transformers calls ``block._gradient_checkpointing_func(fn, *args)`` for blocks with
    ``gradient_checkpointing`` set (``model.gradient_checkpointing_enable``); this replaces that
    function per block by one whose random numbers come from the block's own generator states
    (:class:`_BlockRng`), seeded from ``seed`` (default: ``torch.initial_seed()``) plus the block's
    index. Returns the states for :class:`MicroBatchGraphs` to register. Blocks not on CUDA are
    left as they are.
    """
    base = torch.initial_seed() if seed is None else int(seed)
    streams: list[_BlockRng] = []
    previous: list[tuple[nn.Module, Any]] = []
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if not isinstance(module, GradientCheckpointingLayer) or not getattr(module, "gradient_checkpointing", False):
            continue
        param = next(module.parameters(), None)
        if param is None or param.device.type != "cuda":
            continue
        rng = _BlockRng(param.device, (base + 7919 * (len(streams) + 1)) % (2**63))
        previous.append((module, module._gradient_checkpointing_func))
        module._gradient_checkpointing_func = rng
        streams.append(rng)
    return GraphSafeCheckpointing(streams, previous)
