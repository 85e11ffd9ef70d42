"""What QLoRA and GRIT share: base-model loading in ``configure_model``, the causal-LM training
step, adapter-only checkpoints with checks on resume, optimiser/schedule set-up, and the PEFT
adapter export at the end of ``fit``.

Subclasses implement :meth:`AdapterModule.attach_adapters` and :meth:`AdapterModule.export_adapter`.
How the micro-batches run (compiled blocks, fused loss, activation offload, CUDA graphs) is the
module's :class:`fteval.models.engine.TrainingEngine`, ``module.engine``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from fteval.io import write_json_atomic
from fteval.models.compile import compile_blocks, transformer_blocks
from fteval.models.dense4bit import dense_4bit_inference, fits_in_memory
from fteval.models.engine import TrainingEngine
from fteval.models.fused_loss import FusedLoss
from fteval.models.loading import Quantization, load_causal_lm

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TARGETS", "AdapterModule", "compile_blocks", "is_logging_step", "rng_states", "sequences_in_batch",
           "set_rng_states", "transformer_blocks"]  # compile_blocks, transformer_blocks: from fteval.models.compile

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

    ``compile_blocks``, ``fused_loss``, ``loss_chunk_tokens``, ``activation_offload`` and ``cuda_graph``
    configure the module's :class:`~fteval.models.engine.TrainingEngine` (``self.engine``).

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
        # how the micro-batches run (compiled blocks, fused loss, offload, graphs): fteval.models.engine
        self.engine = TrainingEngine(compile_blocks=compile_blocks, fused_loss=fused_loss,
                                     loss_chunk_tokens=loss_chunk_tokens, activation_offload=activation_offload,
                                     cuda_graph=cuda_graph)
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

    # ------------------------------------------------------------- model set-up
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        loaded = load_causal_lm(
            hp.model_name_or_path,
            quantization=hp.quantization,
            attn_implementation=self.engine.attention(hp.attn_implementation),
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
        blocks = self.engine.prepare(self.model)
        if blocks:
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
        """Mean next-token loss over the labelled tokens (:meth:`TrainingEngine.loss`), and the number of
        sequences in the batch.

        Padded batches carry ``attention_mask`` ``[batch, seq]``; padding-free batches
        (``AlignmentDataModule(padding_free=True)``) are one row ``[1, tokens]`` with
        ``position_ids`` restarting at 0 for every sequence, which transformers turns into
        per-sequence attention.
        """
        return self.engine.loss(self.model, batch), sequences_in_batch(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.engine.training_loss(self.model, batch, batch_idx)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=sequences_in_batch(batch))
        return loss

    def configure_callbacks(self) -> list[L.Callback]:
        """The engine, when it runs backward itself (``cuda_graph``): its fit hooks set up and release the graphs.

        Where a graph cannot run (CPU, several processes, non-SDPA attention) the fit runs eagerly instead,
        with a one-line notice."""
        if self._trainer is not None:
            attn = getattr(self, "attn_implementation", None) or self.hparams.get("attn_implementation")
            reason = self.engine.graph_fallback_reason(self.trainer.strategy.root_device.type, self.trainer.world_size,
                                                       attn)
            if reason is not None:
                notice = self.engine.fall_back_to_eager(reason)
                if self.trainer.is_global_zero:
                    print(notice, file=sys.stderr)
        return [self.engine] if self.engine.runs_backward_in_step else []

    def on_fit_start(self) -> None:
        # a CPU 4-bit base is dequantised once per fit: the same outputs and gradients (eager blocks only)
        self._dense = contextlib.ExitStack()
        if not self.engine.compile_blocks and fits_in_memory(self.model):
            self._dense.enter_context(dense_4bit_inference(self.model, grad=True))

    def on_fit_end(self) -> None:
        self._close_dense()

    def teardown(self, stage: str) -> None:
        self._close_dense()  # a fit that failed before on_fit_end puts bitsandbytes' layers back too

    def _close_dense(self) -> None:
        dense, self._dense = getattr(self, "_dense", None), None
        if dense is not None:
            dense.close()

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, n_seq = self._lm_loss(batch)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=n_seq)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # The loss gradients, before any clipping and before a method's own step (GRIT's preconditioning).
        # One foreach reduction instead of a norm kernel per adapter tensor (448 at Llama-3-8B): at
        # small batches the step is bound by kernel launches (BENCHMARKS.md has what per-tensor norms cost).
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
        """The adapter parameters (``requires_grad``). Cached per model: walking all of an 8B model's
        parameters is host time, and the gradient-norm log needs them every step."""
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
