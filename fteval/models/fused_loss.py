"""Causal-LM loss from the final hidden states without materialising the full logits.

A causal LM's loss normally materialises ``logits`` ``[tokens, vocab]`` in fp32 and their
gradient of the same size: at Llama-3's vocabulary (128,256) and 8 x 4096 tokens that is
2 x 16.8 GB. Here the tokens are split into chunks of ``chunk_tokens``; each chunk's logits exist
only inside that chunk's loss, which runs under activation checkpointing, so at most one chunk's
logits (``chunk_tokens x vocab`` fp32) is alive at a time, in forward and in backward. Backward
recomputes each chunk's ``lm_head`` matmul once (about 1/3 more ``lm_head`` FLOPs, ~2% of a
Llama-3-8B step).

The arithmetic is the one transformers uses for ``ForCausalLM`` models: labels shifted by one,
positions labelled ``-100`` ignored, logits upcast to fp32 before the log-softmax, mean over the
labelled tokens. Models whose logits are not ``lm_head(hidden)`` (final-logit soft-capping,
logit scaling, a bias) are refused with a clear error.

Written here because neither torch nor transformers provides a chunked linear cross-entropy;
``liger-kernel``'s fused kernel (``LigerFusedLinearCrossEntropyLoss``, GPU, Triton) is used instead
when ``implementation='liger'`` and it is installed.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["FusedLoss", "causal_lm_parts", "chunked_linear_cross_entropy", "fused_causal_lm_loss"]

FusedLoss = Literal["off", "chunked", "liger"]
IGNORE = -100


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of one chunk: ``hidden`` ``[C, H]``, ``weight`` ``[V, H]``, ``labels`` ``[C]``."""
    logits = F.linear(hidden, weight)  # [C, V], in autocast's dtype
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # upcast as transformers does
    return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 2048) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, one chunk of tokens at a time.

    Args:
        hidden: ``[tokens, hidden]`` final hidden states (already aligned with ``labels``).
        weight: ``[vocab, hidden]`` output projection.
        labels: ``[tokens]`` target ids, ``-100`` where no loss is taken.
        chunk_tokens: tokens per chunk; peak extra memory is about ``chunk_tokens x vocab x 8`` bytes
            (fp32 logits and their gradient).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    keep = labels != IGNORE
    n = keep.sum()
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start:start + chunk_tokens], labels[start:start + chunk_tokens]
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, h, weight, y, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _chunk_loss_sum(h, weight, y)
    return total / n.clamp(min=1)  # transformers' mean over labelled tokens (0/0 -> 0 instead of NaN)


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The decoder (returns ``last_hidden_state``) and ``lm_head`` of a transformers causal LM, or of a
    peft model around one; refuses models whose logits are more than ``lm_head(hidden)``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    config = getattr(base, "config", None)
    odd = [k for k in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
           if getattr(config, k, None) not in (None, 1, 1.0)]
    if decoder is None or not isinstance(head, nn.Linear) or head.bias is not None or odd:
        raise ValueError(
            f"fused_loss needs a causal LM whose logits are lm_head(hidden) (Llama, Mistral, Qwen, SmolLM); "
            f"{type(base).__name__} has {odd or 'another output layer'}: set --model.init_args.fused_loss off"
        )
    return decoder, head


def fused_causal_lm_loss(model: nn.Module, batch: dict, implementation: FusedLoss = "chunked",
                         chunk_tokens: int = 2048) -> Tensor:
    """The causal-LM loss of ``model`` on ``batch`` (``input_ids``, ``labels``, optional
    ``attention_mask`` / ``position_ids``) computed from the hidden states, never the full logits."""
    decoder, head = causal_lm_parts(model)
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    hidden = decoder(input_ids=batch["input_ids"], **kwargs).last_hidden_state  # [B, T, H]
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t+1
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(hidden.device)
    if implementation == "liger":
        return _liger_loss(hidden, head.weight, labels)
    return chunked_linear_cross_entropy(hidden, head.weight, labels, chunk_tokens)


_LIGER: Optional[nn.Module] = None


def _liger_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    global _LIGER  # one stateless loss object per process
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        raise ValueError(
            "fused_loss 'liger' needs liger-kernel (pip install liger-kernel; GPU with Triton); "
            "use fused_loss 'chunked' instead"
        ) from exc
    if _LIGER is None:
        _LIGER = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    if hidden.dtype != weight.dtype:  # under autocast the hidden states may be fp32 and the head bf16
        hidden = hidden.to(weight.dtype)
    return _LIGER(weight, hidden, labels)
