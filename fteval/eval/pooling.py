"""From hidden states to one vector per prompt: token pooling per layer, then pooling over layers.

Token pooling (:func:`masked_mean`, :func:`pool_layers`) averages the hidden states of the real
prompt tokens, for left or right padding alike, and can leave attention-sink tokens out.
Sink tokens matter: in SmolLM2-135M-Instruct the first token (``<|im_start|>``) has a hidden
state 17-175x the median token norm in layers 12-29 (measured on four chat prompts; every
other token stays below 1.4x there), so a plain mean over all tokens is mostly that one
vector and the safe/unsafe separation of those layers collapses (docs/architecture.md: CHI ~0.6
against 5.5-10 without it). Llama-3 has the same effect.

Layer pooling (:func:`pool_over_layers`) turns ``[N, L+1, D]`` into ``[N, D]`` by ``mean``,
``last`` or ``attention`` (defined in :func:`layer_attention_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_SINK_RATIO",
    "LayerPooling",
    "SinkMode",
    "TokenSelection",
    "last_tokens_mask",
    "layer_attention_weights",
    "layer_reference",
    "masked_mean",
    "pool_layers",
    "pool_over_layers",
    "token_keep_mask",
]

SinkMode = Literal["first", "none", "auto"]
TokenSelection = Literal["prompt", "post_instruction"]
LayerPooling = Literal["mean", "last", "attention"]
_SINK_MODES = ("first", "none", "auto")
_LAYER_POOLINGS = ("mean", "last", "attention")
TOKEN_SELECTIONS = ("prompt", "post_instruction")

#: ``sink="auto"`` drops tokens whose L2 norm exceeds this multiple of the median token norm of
#: their sequence (real tokens only). In SmolLM2-135M-Instruct (31 hidden-state layers, four chat
#: prompts) ordinary tokens stayed below 8.7x the median in every layer, the first token reached
#: 17-175x in layers 12-29 and 5-10x in layers 2-9; 12 sits in the gap, so "auto" removes the
#: massive-activation sinks and keeps ordinary tokens. ``sink="first"`` is the simpler default.
DEFAULT_SINK_RATIO = 12.0


def _check_hidden_and_mask(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Validate ``hidden [B, T, D]`` and ``attention_mask [B, T]``; return the mask as bool."""
    if hidden.ndim != 3:
        raise ValueError(
            f"hidden states must be [batch, seq, hidden], got shape {tuple(hidden.shape)}; pass one layer "
            "of model(..., output_hidden_states=True).hidden_states."
        )
    if attention_mask.ndim != 2 or tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"attention_mask must be [batch, seq] = {tuple(hidden.shape[:2])} to match the hidden states, got "
            f"{tuple(attention_mask.shape)}; pass the tokenizer's attention_mask for the same batch."
        )
    mask = attention_mask.to(device=hidden.device) != 0
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"prompts {empty[:5].tolist()} of the batch have no real token (attention_mask all 0); drop empty "
            "prompts before tokenising."
        )
    return mask


def token_keep_mask(
    hidden: Tensor, attention_mask: Tensor, sink: SinkMode = "first", sink_ratio: float = DEFAULT_SINK_RATIO
) -> Tensor:
    """Which tokens enter the mean: bool ``[B, T]``, a subset of the real tokens, never empty per row.

    Args:
        hidden: ``[B, T, D]`` hidden states of one layer (read only for ``sink="auto"``).
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (left or right).
        sink: ``"none"`` keeps every real token; ``"first"`` drops the first real token of each
            prompt (the attention sink: ``<|im_start|>`` / ``<|begin_of_text|>`` of chat prompts);
            ``"auto"`` drops real tokens whose L2 norm exceeds ``sink_ratio`` times the median
            norm of the real tokens of the same prompt (:data:`DEFAULT_SINK_RATIO`).
        sink_ratio: threshold for ``"auto"`` (> 1).

    A prompt whose tokens would all be dropped (a 1-token prompt with ``"first"``) keeps all of
    its real tokens.
    """
    if sink not in _SINK_MODES:
        raise ValueError(f"sink must be one of {_SINK_MODES}, got {sink!r}.")
    mask = _check_hidden_and_mask(hidden, attention_mask)
    if sink == "none":
        return mask
    if sink == "first":
        rank = mask.long().cumsum(dim=1)  # [B, T]: 1 at the first real token, whatever the padding side
        drop = mask & (rank == 1)
    else:
        if not sink_ratio > 1.0:
            raise ValueError(f"sink_ratio must be > 1 (a multiple of the median token norm), got {sink_ratio}.")
        norms = hidden.detach().float().norm(dim=-1)  # [B, T]
        median = torch.nanmedian(norms.masked_fill(~mask, float("nan")), dim=1).values  # [B]
        drop = mask & (norms > sink_ratio * median[:, None])
    keep = mask & ~drop
    keep = torch.where(keep.any(dim=1, keepdim=True), keep, mask)  # never drop every token
    return keep


def last_tokens_mask(attention_mask: Tensor, counts: Tensor | int) -> Tensor:
    """The last ``counts`` real tokens of each row as an attention mask ``[B, T]`` (left or right padding).

    With ``counts`` = the tokens the chat template appends after the user's message
    (:func:`fteval.data.formatting.generation_suffix_tokens`) this selects the post-instruction
    positions; passed to :func:`pool_layers` with ``sink="none"`` it averages only those. A row with
    fewer real tokens than asked keeps all of them.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask != 0
    counts = torch.as_tensor(counts, device=mask.device).reshape(-1, 1)  # [B or 1, 1]
    if (counts < 1).any():
        raise ValueError(f"counts must be >= 1 token per prompt, got {counts.flatten().tolist()}")
    from_end = mask.flip(1).long().cumsum(dim=1).flip(1)  # [B, T]: 1 at the last real token
    return (mask & (from_end <= counts)).long()


def masked_mean(
    hidden: Tensor, attention_mask: Tensor, sink: SinkMode = "first", sink_ratio: float = DEFAULT_SINK_RATIO
) -> Tensor:
    """Mean hidden state over the kept prompt tokens: ``[B, T, D]`` -> ``[B, D]`` float32.

    See :func:`token_keep_mask` for ``sink``. Padded and dropped positions are zeroed before the
    sum, so NaN at padded positions (possible with left padding and some attention kernels)
    cannot leak in. Accumulates in float32 whatever the model dtype (bf16 hidden states too).
    """
    keep = token_keep_mask(hidden, attention_mask, sink=sink, sink_ratio=sink_ratio)  # [B, T]
    values = torch.where(keep[..., None], hidden.float(), 0.0)  # [B, T, D]
    return values.sum(dim=1) / keep.sum(dim=1, keepdim=True).float()


def pool_layers(
    hidden_states: Sequence[Tensor],
    attention_mask: Tensor,
    sink: SinkMode = "first",
    sink_ratio: float = DEFAULT_SINK_RATIO,
) -> Tensor:
    """Token-pool every layer: ``L+1`` tensors ``[B, T, D]`` -> ``[B, L+1, D]`` float32.

    ``hidden_states`` is ``model(..., output_hidden_states=True).hidden_states``: index 0 is the
    embedding output, index l the output of decoder layer l; in transformers the last entry is
    overwritten by ``last_hidden_state``, i.e. taken after the model's final norm (no sink
    there). With ``sink="auto"`` each layer
    decides its own sink tokens (the sink is massive only in some layers).
    """
    if isinstance(hidden_states, Tensor) or len(hidden_states) == 0:
        raise ValueError(
            "hidden_states must be a non-empty tuple of [batch, seq, hidden] tensors (embeddings + every "
            "layer); call the model with output_hidden_states=True and pass outputs.hidden_states."
        )
    return torch.stack(
        [masked_mean(h, attention_mask, sink=sink, sink_ratio=sink_ratio) for h in hidden_states], dim=1
    )


def _check_representations(representations: Tensor) -> None:
    if representations.ndim != 3:
        raise ValueError(
            f"representations must be [N prompts, L+1 layers, D], got shape {tuple(representations.shape)}; "
            "concatenate the outputs of pool_layers over batches."
        )


def layer_reference(representations: Tensor) -> Tensor:
    """Reference vectors for attention pooling: ``[N, L+1, D]`` -> ``[L+1, D]`` float64 unit vectors.

    r_l = mean_i h_{i,l} / ||mean_i h_{i,l}||, the direction of the average prompt at layer l.
    It uses no labels (no leakage of the safe/unsafe split into the representation), and it
    is computed per model on the prompts being evaluated: call it on the full evaluated set
    (all DDP ranks gathered), once per model (baseline and tuned each get their own).
    """
    _check_representations(representations)
    mean = representations.to(torch.float64).mean(dim=0)  # [L+1, D]
    norm = mean.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("a layer's mean representation is the zero vector, so it has no direction; use method='mean'.")
    return mean / norm


def layer_attention_weights(representations: Tensor, reference: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Per-prompt layer weights of attention pooling.

    For prompt i and layer l (h_{i,l} the token-pooled representation, D its width):

        s_{i,l} = <h_{i,l}, r_l> / sqrt(D),   a_{i,l} = softmax_l(s_{i,l}),

    with r_l from :func:`layer_reference` unless ``reference`` ``[L+1, D]`` is given. The score is
    the projection of h_{i,l} on the mean direction of its layer, scaled as in dot-product
    attention; it grows with the layer's norm, so in LLMs (norms grow with depth) the weights
    lean to deep layers: inspect them before relying on this pooling.

    Returns ``(weights [N, L+1], reference [L+1, D])``, float64.
    """
    _check_representations(representations)
    reps = representations.to(torch.float64)
    if reference is None:
        reference = layer_reference(reps)
    elif tuple(reference.shape) != tuple(reps.shape[1:]):
        raise ValueError(
            f"reference must be [L+1, D] = {tuple(reps.shape[1:])}, got {tuple(reference.shape)}; "
            "build it with layer_reference(representations)."
        )
    reference = reference.to(device=reps.device, dtype=torch.float64)
    scores = torch.einsum("nld,ld->nl", reps, reference) / reps.shape[-1] ** 0.5  # [N, L+1]
    return torch.softmax(scores, dim=-1), reference


def pool_over_layers(representations: Tensor, method: LayerPooling = "attention") -> Tensor:
    """One vector per prompt from its per-layer vectors: ``[N, L+1, D]`` -> ``[N, D]`` (input dtype).

    ``mean``: the plain average over layers 0..L; ``last``: layer L (in transformers the
    final hidden state, after the model's final norm); ``attention``: sum_l a_{i,l} h_{i,l} with the weights of
    :func:`layer_attention_weights`. To restrict to some layers, slice ``representations`` first.
    """
    _check_representations(representations)
    if method == "mean":
        return representations.mean(dim=1)
    if method == "last":
        return representations[:, -1]
    if method == "attention":
        weights, _ = layer_attention_weights(representations)
        pooled = torch.einsum("nl,nld->nd", weights, representations.to(torch.float64))
        return pooled.to(representations.dtype)
    raise ValueError(f"layer pooling method must be one of {_LAYER_POOLINGS}, got {method!r}.")
