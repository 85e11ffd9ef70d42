"""What QLoRA and GRIT share: base-model loading in ``configure_model``, the causal-LM training
step, adapter-only checkpoints with checks on resume, optimiser/schedule set-up, and the PEFT
adapter export at the end of ``fit``.

Subclasses implement :meth:`AdapterModule.attach_adapters` and :meth:`AdapterModule.export_adapter`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from fteval.io import write_json_atomic
from fteval.models.cuda_graph import MicroBatchGraphs, graph_safe_checkpointing
from fteval.models.dense4bit import dense_4bit_inference, fits_in_memory
from fteval.models.fused_loss import FusedLoss, fused_causal_lm_loss
from fteval.models.loading import Quantization, load_causal_lm
from fteval.models.offload import offload_activations

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_logging_step(trainer) -> bool:
    """Whether Lightning writes this optimizer step's on_step values to the loggers.

    Lightning keeps values logged between logging steps only in ``callback_metrics``; step
    diagnostics that cost host time (gradient norms, GRIT's metrics) are computed only when
    this is True. Reads the trainer's logger connector (Lightning 2.x ``should_update_logs``);
    True when that is not available.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


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
    import importlib.util
    import os
    import shutil

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


def sequences_in_batch(batch: dict) -> int:
    """Sequences in a training batch: ``num_sequences`` of a padding-free batch (a Python int, so no
    device sync), else its rows."""
    n = batch.get("num_sequences")
    return int(n) if n is not None else int(batch["input_ids"].shape[0])


def rng_states() -> dict:
    """The global random states (torch CPU and CUDA, numpy, random) in types a weights-only load accepts."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict) -> None:
    """Restore what :func:`rng_states` returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class AdapterModule(L.LightningModule):
    """Base for adapter fine-tuning modules (not used directly).

    Args:
        model_name_or_path: 'embedded', a local model folder or a hub id.
        quantization: 'nf4' (QLoRA's 4-bit NormalFloat), 'fp4', or 'none' (plain LoRA on a full-precision base).
        r: adapter rank.
        alpha: adapter scale numerator (scale = alpha / r, or alpha / sqrt(r) with use_rslora).
        dropout: dropout on the adapter input.
        target_modules: linear layer names (suffixes) that get adapters.
        use_rslora: rank-stabilised scaling alpha / sqrt(r).
        optimizer: optimiser factory over the adapter parameters (e.g. AdamW, or
            bitsandbytes.optim.PagedAdamW8bit on GPU).
        lr_schedule: 'cosine' (decay to 0 over the run after warm-up) or 'constant' (after warm-up).
        warmup_steps: linear warm-up in optimizer steps.
        gradient_checkpointing: recompute activations in backward (non-reentrant).
        compile_blocks: ``torch.compile`` every transformer block after the adapters are attached
            (regional compilation: the blocks are identical, so one compiled graph serves all of
            them and the first step pays one compile, not one per block). Fuses the elementwise
            work between the matmuls and cuts per-layer Python at small batches; the first
            steps take seconds to minutes longer. Needs a C++ compiler on CPU, Triton on GPU.
        attn_implementation: 'auto' (flash_attention_2 if installed, else sdpa; sdpa with
            ``cuda_graph``), 'sdpa', 'eager'.
        fused_loss: 'off' (transformers' loss over the full logits), 'chunked' (the loss from the
            final hidden states, ``loss_chunk_tokens`` at a time: the full ``[tokens, vocab]`` fp32
            logits and their gradient never exist; same value and gradients) or 'liger'
            (liger-kernel's fused kernel, GPU). For training and validation alike.
        loss_chunk_tokens: tokens per chunk of the 'chunked' loss (extra memory about
            ``loss_chunk_tokens x vocab x 8`` bytes).
        activation_offload: keep the activations saved for backward in pinned host memory
            (:mod:`fteval.models.offload`); with ``gradient_checkpointing`` that is each block's
            input. Saves device memory at long sequences, costs host-device copies. GPU only
            (a no-op on CPU).
        cuda_graph: run each training micro-batch's forward and backward from a CUDA graph
            (:mod:`fteval.models.cuda_graph`): a batch shape runs eagerly twice, is captured,
            and later micro-batches of that shape replay it with one launch, which removes the
            per-layer host time that bounds small batches. At most 16 batch shapes are
            captured (``data.pad_to_multiple_of`` makes shapes repeat); padding-free batches run
            eagerly. Needs a CUDA device, one process, bf16 or fp32 precision, SDPA attention
            and no ``activation_offload``.
        cache_dir: where the embedded model is materialised.
        export_dir: where the PEFT adapter folder is written after fit (default: <log_dir>/adapter).
    """

    method_name = "adapter"

    def __init__(
        self,
        model_name_or_path: str = "embedded",
        quantization: Quantization = "nf4",
        r: int = 16,
        alpha: float = 32.0,
        dropout: float = 0.05,
        target_modules: tuple[str, ...] = DEFAULT_TARGETS,
        use_rslora: bool = False,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 0,
        gradient_checkpointing: bool = False,
        compile_blocks: bool = False,
        attn_implementation: str = "auto",
        fused_loss: FusedLoss = "off",
        loss_chunk_tokens: int = 2048,
        activation_offload: bool = False,
        cuda_graph: bool = False,
        cache_dir: Optional[str] = None,
        export_dir: Optional[str] = None,
    ):
        super().__init__()
        if r < 1:
            raise ValueError(f"r={r}: the adapter rank must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must lie in [0, 1)")
        if not target_modules:
            raise ValueError("target_modules is empty; name at least one linear layer (e.g. q_proj)")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
        if fused_loss not in ("off", "chunked", "liger"):
            raise ValueError(f"fused_loss={fused_loss!r} must be 'off', 'chunked' or 'liger'")
        if loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens={loss_chunk_tokens} must be >= 1")
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_factory = optimizer
        self.model: Optional[torch.nn.Module] = None
        self.tokenizer = None
        self.attn_implementation: Optional[str] = None
        self.strict_loading = False  # checkpoints hold adapter weights only
        self.exported_adapter: Optional[Path] = None
        self.experiment_id: Optional[int] = None  # set by callbacks.run_logger.ExperimentDBLogger
        self.experiment_db_path: Optional[str] = None  # the database that experiment is in (same logger)
        self.artifact_paths: dict[str, str] = {}  # recorded by the run logger at the end of fit
        self.micro_batch_hooks: list = []  # work around each graphed micro-batch (add_micro_batch_hook)
        self._graphs: Optional[MicroBatchGraphs] = None  # cuda_graph: the captured micro-batches of this fit
        self._graph_rng = None  # cuda_graph with checkpointing: the blocks' generator states
        self._cuda_graph_capture = True  # False: the same path without capture (CPU tests)

    # ------------------------------------------------------------- model set-up
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        attn = hp.attn_implementation
        if attn == "auto" and hp.get("cuda_graph", False):
            attn = "sdpa"  # graphed batches carry a 4D mask, which flash_attention_2 does not take
        loaded = load_causal_lm(
            hp.model_name_or_path,
            quantization=hp.quantization,
            attn_implementation=attn,
            cache_dir=Path(hp.cache_dir) if hp.cache_dir else None,
            device=device,
        )
        self.tokenizer, self.attn_implementation = loaded.tokenizer, loaded.attn_implementation
        self.setup_base_model(loaded.model)

    def setup_base_model(self, model: torch.nn.Module, attn_implementation: Optional[str] = None) -> None:
        """Freeze ``model``, attach the adapters, enable checkpointing; keep the result as ``self.model``.

        ``configure_model`` calls this after loading by name. Callers that build the base
        themselves (``fteval bench`` builds random-weight models from a config) call it before
        ``Trainer.fit``; ``configure_model`` then leaves the model as it is.
        """
        hp = self.hparams
        if attn_implementation is not None:
            self.attn_implementation = attn_implementation
        model.config.use_cache = False
        model.train()  # from_pretrained returns eval mode; Lightning toggles modes from here on
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = self.attach_adapters(model)
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        if hp.get("compile_blocks", False):
            blocks = compile_blocks(self.model)
            log.info("%s: torch.compile on %d transformer blocks (%s)", self.method_name, len(blocks),
                     ", ".join(sorted({type(b).__name__ for b in blocks})))
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.model.parameters())
        if n_train == 0:
            raise ValueError(f"no trainable parameters after attaching adapters to {list(hp.target_modules)}")
        log.info("%s: %d trainable of %d parameters (%.2f%%), attention %s", self.method_name, n_train, n_all,
                 100 * n_train / n_all, self.attn_implementation)

    def attach_adapters(self, model: torch.nn.Module) -> torch.nn.Module:
        raise NotImplementedError

    def export_adapter(self, output_dir: Path) -> Path:
        raise NotImplementedError

    # ----------------------------------------------------------------- steps
    def forward(self, **batch):
        return self.model(**batch)

    def _lm_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Mean next-token loss over the labelled tokens, and the number of sequences in the batch.

        Padded batches carry ``attention_mask`` ``[batch, seq]``; padding-free batches
        (``AlignmentDataModule(padding_free=True)``) are one row ``[1, tokens]`` with
        ``position_ids`` restarting at 0 for every sequence, which transformers turns into
        per-sequence attention.
        """
        fused = self.hparams.get("fused_loss", "off")
        if fused != "off":
            loss = fused_causal_lm_loss(self.model, batch, fused, self.hparams.get("loss_chunk_tokens", 2048))
            return loss, sequences_in_batch(batch)
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        out = self.model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs)
        return out.loss, sequences_in_batch(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._graphs is not None:
            loss, n_seq = self._graphed_step(batch, batch_idx), sequences_in_batch(batch)
        else:
            with offload_activations(bool(self.hparams.get("activation_offload", False))):
                loss, n_seq = self._lm_loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n_seq)
        return loss

    # ------------------------------------------------------------- cuda_graph
    def add_micro_batch_hook(self, hook) -> None:
        """Have ``hook.before(batch)`` and ``hook.after()`` run around every training micro-batch's
        forward and backward under ``cuda_graph`` (inside the captured region: device work in them
        repeats at every replay, their Python runs while capturing). GRIT's K-FAC statistics use it."""
        if hook not in self.micro_batch_hooks:
            self.micro_batch_hooks.append(hook)

    def remove_micro_batch_hook(self, hook) -> None:
        if hook in self.micro_batch_hooks:
            self.micro_batch_hooks.remove(hook)

    @property
    def cuda_graph_enabled(self) -> bool:
        """Whether training micro-batches run forward and backward in ``training_step`` (``cuda_graph``)."""
        return bool(self.hparams.get("cuda_graph", False))

    def _check_cuda_graph(self) -> None:
        trainer = self.trainer
        if self.device.type != "cuda" and self._cuda_graph_capture:
            raise ValueError(f"cuda_graph: true needs a CUDA device, but this fit runs on {self.device.type}; "
                             "set --model.init_args.cuda_graph false")
        if str(trainer.precision).startswith("16"):
            raise ValueError(f"cuda_graph: true cannot run under precision {trainer.precision!r} (its loss scale "
                             "changes between steps); use bf16-mixed or set cuda_graph: false")
        if trainer.world_size > 1:
            raise ValueError(f"cuda_graph: true runs in one process, but this fit has {trainer.world_size} (the "
                             "gradient all-reduce runs inside backward); set cuda_graph: false for multi-GPU fits")
        if self.attn_implementation not in (None, "sdpa"):
            raise ValueError(f"cuda_graph: true needs attn_implementation sdpa (graphed batches carry their causal mask "
                             f"as a 4D tensor), but the model uses {self.attn_implementation!r}; set "
                             "--model.init_args.attn_implementation sdpa or cuda_graph: false")
        if self.hparams.get("activation_offload", False):
            raise ValueError("cuda_graph and activation_offload cannot both be on (offload copies to host memory "
                             "on a side stream); turn one of them off")

    def on_fit_start(self) -> None:
        self._dense = contextlib.ExitStack()
        # CPU 4-bit base: dequantised once per fit, same outputs and gradients (eager blocks only)
        if not self.hparams.get("compile_blocks", False) and fits_in_memory(self.model):
            self._dense.enter_context(dense_4bit_inference(self.model, grad=True))
        if not self.cuda_graph_enabled:
            return
        self._check_cuda_graph()
        if self.hparams.gradient_checkpointing and self._cuda_graph_capture:
            self._graph_rng = graph_safe_checkpointing(self.model)
        self._graphs = MicroBatchGraphs(self._forward_backward, self.trainable_parameters(),
                                        checkpointing=self._graph_rng, capture=self._cuda_graph_capture)

    def on_fit_end(self) -> None:
        if getattr(self, "_dense", None) is not None:
            self._dense.close()
        graphs, self._graphs = self._graphs, None  # frees the graphs' memory pool
        rng, self._graph_rng = self._graph_rng, None
        if rng is not None:
            rng.restore()  # the blocks' own checkpoint function back
        if graphs is not None and self.trainer.is_global_zero:
            c = graphs.counts
            print(f"[fteval] cuda_graph: {c['replayed']} micro-batches replayed, {len(graphs.graphs)} batch shapes "
                  f"captured, {c['eager'] + c['eager_unsupported']} run eagerly (warm-up, uncaptured shapes, "
                  "padding-free batches)")

    def _forward_backward(self, batch: dict) -> torch.Tensor:
        """One micro-batch's forward and backward (with the registered hooks); the loss, unnormalised."""
        for hook in self.micro_batch_hooks:
            hook.before(batch)
        loss, _ = self._lm_loss(batch)
        (loss / self.trainer.accumulate_grad_batches).backward()  # as Lightning normalises before its backward
        for hook in self.micro_batch_hooks:
            hook.after()
        return loss

    def _graphed_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # gradients zeroed in place where Lightning would zero them: the accumulation window's first micro-batch
        return self._graphs.step(batch, zero_grads=batch_idx % self.trainer.accumulate_grad_batches == 0)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self._graphs is not None:
            return  # cuda_graph: training_step ran this micro-batch's backward
        super().backward(loss, *args, **kwargs)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self._graphs is not None:
            return  # cuda_graph: zeroed in place at the accumulation window's first micro-batch (training_step)
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_seq = self._lm_loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=n_seq)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # The loss gradients, before any clipping and before a method's own step (GRIT's preconditioning).
        # One foreach reduction instead of a norm kernel per adapter tensor (448 at Llama-3-8B): at
        # small batches the step is bound by kernel launches, and per-tensor norms cost ~10% there.
        if not is_logging_step(self.trainer):
            return  # Lightning writes on_step values only on logging steps: skip the work in between
        grads = [p.grad.detach() for p in self.trainable_parameters() if p.grad is not None]
        if grads:
            norms = torch._foreach_norm(grads)
            self.log("train/grad_norm", torch.linalg.vector_norm(torch.stack(norms).float()), on_step=True, on_epoch=False)

    @contextlib.contextmanager
    def adapters_disabled(self):
        """Run ``self.model`` as its base model: peft's ``disable_adapter`` for LoRA, each GRIT
        layer's ``adapter_enabled`` flag otherwise (both give exactly the base layers' outputs)."""
        if hasattr(self.model, "disable_adapter"):
            with self.model.disable_adapter():
                yield self.model
            return
        layers = [m for m in self.model.modules() if hasattr(m, "adapter_enabled")]
        before = [m.adapter_enabled for m in layers]
        for m in layers:
            m.adapter_enabled = False
        try:
            yield self.model
        finally:
            for m, flag in zip(layers, before):
                m.adapter_enabled = flag

    # ------------------------------------------------------------- optimiser
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter parameters (``requires_grad``). Cached per model: walking an 8B model's
        parameters costs milliseconds, and the gradient-norm log needs them every step."""
        cached = getattr(self, "_trainable_cache", None)
        if cached is not None and cached[0] is self.model:
            return list(cached[1])
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._trainable_cache = (self.model, params)
        return list(params)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer the trainer steps, built around the configured one (a method's own step, e.g.
        GRIT's; the configured optimizer itself by default)."""
        return optimizer

    def configure_optimizers(self):
        try:
            optimizer = self.optimizer_factory(self.trainable_parameters())
        except ValueError as exc:  # torch's own argument checks ("Invalid learning rate: -1.0")
            raise ValueError(f"--model.init_args.optimizer: {exc}; fix its init_args (e.g. lr > 0)") from None
        for group in optimizer.param_groups:
            if not group.get("lr", 0) > 0:
                raise ValueError(f"learning rate {group.get('lr')} must be > 0; set --model.init_args.optimizer.init_args.lr")
        warmup = self.hparams.warmup_steps
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        cosine = self.hparams.lr_schedule == "cosine"

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if not cosine:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        optimizer = self.wrap_optimizer(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------ checkpoints
    def _identity(self) -> dict:
        hp = self.hparams
        return {"method": self.method_name, "base_model": hp.model_name_or_path, "r": hp.r,
                "target_modules": list(hp.target_modules)}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["fteval"] = self._identity()
        checkpoint["fteval_rng"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("fteval")
        if saved is None:
            raise ValueError("this checkpoint was not written by fteval (no 'fteval' entry); pass an fteval checkpoint")
        mine = self._identity()
        for key in ("method", "base_model", "r", "target_modules"):
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint {key} is {saved.get(key)!r} but this run has {mine[key]!r}; resume with the "
                    f"same config as the run that wrote it (a {saved.get('method')} checkpoint of {saved.get('base_model')})"
                )
        self._rng_to_restore = checkpoint.get("fteval_rng")
        if self.model is not None:
            trainable = {n for n, p in self.named_parameters() if p.requires_grad}
            missing = sorted(trainable - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]}); it is incomplete")

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # The random streams (dropout) continue where the checkpointed run was: restored here, just
        # before the first resumed forward, so nothing between loading and training draws from them.
        state, self._rng_to_restore = getattr(self, "_rng_to_restore", None), None
        if state is not None:
            set_rng_states(state)

    # ---------------------------------------------------------------- export
    def on_train_end(self) -> None:
        log_dir = self.trainer.log_dir  # every rank must read it (it may synchronise under DDP)
        if not self.trainer.is_global_zero:
            return
        out = Path(self.hparams.export_dir) if self.hparams.export_dir else Path(log_dir or ".") / "adapter"
        self.exported_adapter = self.export_adapter(out)
        self._write_run_description(out, log_dir)
        self.artifact_paths = {"adapter": str(out)}
        log.info("exported %s adapter to %s", self.method_name, out)
        print(f"[fteval] {self.method_name} adapter written to {out}")

    def _write_run_description(self, out: Path, log_dir: Optional[str]) -> None:
        """Make the adapter folder describe itself: method, base model, resolved config."""
        hp = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()}
        meta = {**self._identity(), "hparams": hp, "attn_implementation": self.attn_implementation,
                "global_step": self.trainer.global_step}
        write_json_atomic(out / "fteval_run.json", meta)
        if log_dir and (Path(log_dir) / "config.yaml").is_file():
            shutil.copyfile(Path(log_dir) / "config.yaml", out / "fteval_config.yaml")
