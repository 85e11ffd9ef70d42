"""The training engine: how an adapter method's micro-batches run, apart from what they compute.

:class:`fteval.models.base.AdapterModule` says *what* a training step is (the causal-LM loss on the
adapters); :class:`TrainingEngine` says *how* it runs:

* compiled blocks (``compile_blocks``, :mod:`fteval.models.compile`), applied by :meth:`TrainingEngine.prepare`;
* the loss from the hidden states (``fused_loss``, :mod:`fteval.models.fused_loss`), :meth:`TrainingEngine.loss`;
* activation offload (``activation_offload``, :mod:`fteval.models.offload`) around each training forward;
* CUDA graphs (``cuda_graph``, :mod:`fteval.models.cuda_graph`): forward *and* backward of each
  training micro-batch run inside :meth:`TrainingEngine.training_loss`, from a captured graph.

The options keep their names on the model (``--model.init_args.cuda_graph`` etc.): the module builds
its engine from them and keeps it as ``module.engine``. ``fteval bench train`` builds the same engine
for its plain reference loop and drives it through the same methods.

Why a Lightning callback the module owns (``AdapterModule.configure_callbacks`` returns it when
``cuda_graph`` is on) rather than code in the module or a Trainer plugin: with ``cuda_graph`` the
engine runs backward itself, so it must keep Lightning's own ``zero_grad`` (which Lightning calls
*after* ``training_step`` at the first micro-batch of an accumulation window) and backward from
touching that micro-batch's gradients, and must set up and release its graphs around the fit.
Those are callback hooks (``on_fit_start``, ``on_before_zero_grad``, ``on_after_backward``,
``on_fit_end``), so the module needs no ``backward``/``optimizer_zero_grad`` overrides; and a
plugin would have to be named in the Trainer's configuration, where the model's options could no
longer reach it. What Lightning backpropagates under ``cuda_graph`` is the loss value as a fresh
leaf tensor (:meth:`TrainingEngine.training_loss`), which reaches no parameter.

Work that must run inside each micro-batch when the engine runs backward (GRIT's K-FAC
statistics: a graph replay runs no Python in between) registers a :class:`MicroBatchObserver` with
:meth:`TrainingEngine.add_micro_batch_observer`; :func:`training_engine` finds a module's engine.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from fteval.models.compile import compile_blocks
from fteval.models.cuda_graph import MicroBatchGraphs, graph_safe_checkpointing
from fteval.models.fused_loss import FusedLoss, fused_causal_lm_loss
from fteval.models.offload import offload_activations

__all__ = ["MicroBatchObserver", "TrainingEngine", "training_engine"]


class MicroBatchObserver:
    """Work around each training micro-batch's forward and backward while the engine runs them
    (:attr:`TrainingEngine.runs_backward_in_step`). Subclass it and register the instance with
    :meth:`TrainingEngine.add_micro_batch_observer`.

    Under ``cuda_graph`` both methods run inside the captured region: device work in them repeats at
    every replay, their Python runs only while a batch shape is run eagerly or captured. So they
    must act on device tensors that outlive the graph, never read device values on the host.
    """

    def before_micro_batch(self, batch: Mapping) -> None:
        """Before the forward, with the batch the forward reads."""

    def after_micro_batch(self) -> None:
        """After the backward of the same micro-batch."""


class TrainingEngine(L.Callback):
    """How training micro-batches run: compiled blocks, fused loss, activation offload, CUDA graphs.

    Args:
        compile_blocks: ``torch.compile`` every transformer block in :meth:`prepare`.
        fused_loss: 'off', 'chunked' or 'liger' (see :class:`fteval.models.base.AdapterModule`).
        loss_chunk_tokens: tokens per chunk of the 'chunked' loss.
        activation_offload: tensors saved for backward go to pinned host memory during the training forward.
        cuda_graph: forward and backward of each training micro-batch from a CUDA graph.
        capture: False runs the ``cuda_graph`` path (static buffers, in-place gradients, forward and
            backward inside the step, the observers) without capturing graphs: on machines without CUDA.
    """

    def __init__(
        self,
        compile_blocks: bool = False,
        fused_loss: FusedLoss = "off",
        loss_chunk_tokens: int = 2048,
        activation_offload: bool = False,
        cuda_graph: bool = False,
        capture: bool = True,
    ) -> None:
        if fused_loss not in ("off", "chunked", "liger"):
            raise ValueError(f"fused_loss={fused_loss!r} must be 'off', 'chunked' or 'liger'")
        if loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 1")
        self.compile_blocks = bool(compile_blocks)
        self.fused_loss = fused_loss
        self.loss_chunk_tokens = int(loss_chunk_tokens)
        self.activation_offload = bool(activation_offload)
        self.cuda_graph = bool(cuda_graph)
        self.capture = bool(capture)
        self.graphs: Optional[MicroBatchGraphs] = None  # while started: the captured micro-batches
        self.counts: Counter = Counter()  # the last run's graph counts ("eager", "captured", "replayed", ...)
        self._observers: list[MicroBatchObserver] = []
        self._checkpointing = None  # graph-safe checkpoint functions installed by start()
        self._accumulate = 1

    # ------------------------------------------------------------------ model set-up
    def attention(self, requested: str) -> str:
        """The attention implementation to load: ``requested``, except 'auto' under ``cuda_graph`` gives
        'sdpa' (graphed batches carry a 4D mask, which flash_attention_2 does not take)."""
        return "sdpa" if requested == "auto" and self.cuda_graph else requested

    def prepare(self, model: nn.Module) -> list[nn.Module]:
        """What the engine does to a model once its adapters (and checkpointing) are on: compile its blocks
        under ``compile_blocks``. Returns the compiled blocks (empty otherwise)."""
        return compile_blocks(model) if self.compile_blocks else []

    # ------------------------------------------------------------------ losses
    def loss(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """Mean next-token loss of ``model`` over the labelled tokens of ``batch``: from the hidden states
        under ``fused_loss``, else transformers' own (``input_ids``, ``labels`` and the batch's
        ``attention_mask`` / ``position_ids``)."""
        if self.fused_loss != "off":
            return fused_causal_lm_loss(model, batch, self.fused_loss, self.loss_chunk_tokens)
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        return model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss

    def training_loss(self, model: nn.Module, batch: Mapping, batch_idx: int = 0) -> torch.Tensor:
        """One training micro-batch's loss for the caller to backpropagate.

        Eager: :meth:`loss` (under activation offload when on). While started with ``cuda_graph``: the
        micro-batch's forward and backward run here (gradients zeroed in place first at the first
        micro-batch of an accumulation window, ``batch_idx``), and the returned loss is its value as a
        new leaf tensor, whose backward reaches no parameter.
        """
        if self.graphs is None:
            with offload_activations(self.activation_offload):
                return self.loss(model, batch)
        loss = self.graphs.step(batch, zero_grads=batch_idx % self._accumulate == 0)
        return loss.requires_grad_()

    # ------------------------------------------------------------------ micro-batches run by the engine
    @property
    def runs_backward_in_step(self) -> bool:
        """Whether training micro-batches run forward and backward in :meth:`training_loss` (``cuda_graph``)."""
        return self.cuda_graph

    def add_micro_batch_observer(self, observer: MicroBatchObserver) -> None:
        """Have ``observer`` run around every micro-batch the engine runs (see :class:`MicroBatchObserver`)."""
        if not isinstance(observer, MicroBatchObserver):
            raise TypeError(f"{type(observer).__name__} is not a MicroBatchObserver")
        if observer not in self._observers:
            self._observers.append(observer)

    def remove_micro_batch_observer(self, observer: MicroBatchObserver) -> None:
        if observer in self._observers:
            self._observers.remove(observer)

    def forward_backward(self, model: nn.Module, batch: Mapping) -> torch.Tensor:
        """One micro-batch's forward and backward with the observers around them; the loss, unnormalised
        (backward takes it divided by the accumulation, as Lightning normalises before its backward)."""
        for observer in self._observers:
            observer.before_micro_batch(batch)
        loss = self.loss(model, batch)
        (loss / self._accumulate).backward()
        for observer in self._observers:
            observer.after_micro_batch()
        return loss

    def start(self, model: nn.Module, params: list[nn.Parameter], accumulate_grad_batches: int = 1) -> None:
        """Set up the graphs of a run under ``cuda_graph`` (a no-op otherwise): ``params`` are the trainable
        parameters, whose ``.grad`` backward accumulates into."""
        self._accumulate = int(accumulate_grad_batches)
        if not self.cuda_graph:
            return
        rng = graph_safe_checkpointing(model) if self.capture else None
        if rng is not None and not rng.streams:
            rng = None  # no checkpointed block
        self._checkpointing = rng
        self.graphs = MicroBatchGraphs(lambda batch: self.forward_backward(model, batch), params,
                                       checkpointing=rng, capture=self.capture)

    def stop(self) -> Counter:
        """Release the graphs (and their memory pool) and the checkpoint functions; returns the run's counts."""
        graphs, self.graphs = self.graphs, None
        rng, self._checkpointing = self._checkpointing, None
        if rng is not None:
            rng.restore()  # the blocks' own checkpoint function back
        if graphs is not None:
            if graphs.unbound:
                graphs.rebind_grads()
            self.counts = Counter(graphs.counts)
        return self.counts

    # ------------------------------------------------------------------ Lightning hooks
    def graph_fallback_reason(self, device_type: str, world_size: int, attn_implementation: Optional[str]) -> Optional[str]:
        """Why ``cuda_graph`` cannot run in this fit, where eager micro-batches compute the same thing (None when
        it can): not on a CUDA device (with capture on), several processes (the gradient all-reduce runs inside
        backward), or an attention other than SDPA (graphed batches carry their causal mask as a 4D tensor)."""
        if not self.cuda_graph:
            return None
        if device_type != "cuda" and self.capture:
            return f"this fit runs on {device_type}, and graphs need a CUDA device"
        if world_size > 1:
            return f"this fit runs in {world_size} processes, and graphs run in one"
        if attn_implementation not in (None, "auto", "sdpa"):
            return f"the model uses attention {attn_implementation!r}, and graphs need sdpa"
        return None

    def fall_back_to_eager(self, reason: str) -> str:
        """Turn ``cuda_graph`` off for this run; returns the one-line notice to show."""
        self.cuda_graph = False
        return f"[fteval] cuda_graph: off for this fit ({reason}); micro-batches run eagerly"

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a fit ``cuda_graph`` cannot run, naming the setting to change."""
        device = pl_module.device.type
        if device != "cuda" and self.capture:
            raise ValueError(f"cuda_graph: true needs a CUDA device, but this fit runs on {device}; "
                             "set --model.init_args.cuda_graph false")
        if str(trainer.precision).startswith("16"):
            raise ValueError(f"cuda_graph: true cannot run under precision {trainer.precision!r} (its loss scale "
                             "changes between steps); use bf16-mixed or set cuda_graph: false")
        if trainer.world_size > 1:
            raise ValueError(f"cuda_graph: true runs in one process, but this fit has {trainer.world_size} (the "
                             "gradient all-reduce runs inside backward); set cuda_graph: false for multi-GPU fits")
        attn = getattr(pl_module, "attn_implementation", None)
        if attn not in (None, "sdpa"):
            raise ValueError(f"cuda_graph: true needs attn_implementation sdpa (graphed batches carry their causal mask "
                             f"as a 4D tensor), but the model uses {attn!r}; set "
                             "--model.init_args.attn_implementation sdpa or cuda_graph: false")
        if self.activation_offload:
            raise ValueError("cuda_graph and activation_offload cannot both be on (offload copies to host memory "
                             "on a side stream); turn one of them off")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.cuda_graph:
            return
        self.check(trainer, pl_module)
        self.start(pl_module.model, pl_module.trainable_parameters(), trainer.accumulate_grad_batches)

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # Lightning zeroes after training_step, which under cuda_graph already ran this micro-batch's backward.
        if self.graphs is not None:
            self.graphs.unbind_grads()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.graphs is not None:
            self.graphs.rebind_grads()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        had_graphs = self.graphs is not None
        graphs = self.graphs
        shapes = len(graphs.graphs) if graphs is not None else 0
        c = self.stop()
        if had_graphs and trainer.is_global_zero:
            print(f"[fteval] cuda_graph: {c['replayed']} micro-batches replayed, {shapes} batch shapes "
                  f"captured, {c['eager'] + c['eager_unsupported']} run eagerly (warm-up, uncaptured shapes, "
                  "padding-free batches)")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop()  # a fit that failed before on_fit_end releases its graphs too


def training_engine(pl_module: Any) -> Optional[TrainingEngine]:
    """The :class:`TrainingEngine` of ``pl_module`` (``AdapterModule.engine``), or None for modules without one."""
    engine = getattr(pl_module, "engine", None)
    return engine if isinstance(engine, TrainingEngine) else None
