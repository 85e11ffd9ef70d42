"""Padding-free batches: same loss, gradients and K-FAC statistics as the padded batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner, token_mask_from_batch
from fteval.data.formatting import flatten_batch, pad_batch
from fteval.models.base import sequences_in_batch
from fteval.grit import inject_grit_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


def examples() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n, prompt in ((11, 4), (6, 3), (9, 5)):  # different lengths: the padded batch holds 33 - 26 = 7 pads
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def tiny(attn: str) -> LlamaForCausalLM:
    """Tiny Llama with GRIT layers; use_cache=False as training sets it (transformers detects packed
    sequences from position_ids only without a cache)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg)
    layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def test_flatten_batch_layout():
    feats = examples()
    batch = flatten_batch(feats)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_sequences"}
    assert batch["input_ids"].shape == (1, 26) and batch["num_sequences"] == 3
    assert batch["position_ids"][0].tolist() == list(range(11)) + list(range(6)) + list(range(9))
    labels = batch["labels"][0].tolist()
    assert labels[11] == labels[17] == -100  # no token predicts across a boundary
    # labelled tokens: those of the padded batch, in order
    padded = pad_batch(feats, 0)
    assert [t for t in labels if t != -100] == [t for t in padded["labels"].flatten().tolist() if t != -100]
    assert sequences_in_batch(batch) == 3 and sequences_in_batch(padded) == 3
    mask = token_mask_from_batch(batch)
    assert int(mask.sum()) == int(token_mask_from_batch(padded).sum()) == 7 + 3 + 4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_matches_padded_loss_gradients_and_statistics(attn, one_thread):
    feats = examples()
    results = []
    for batch in (pad_batch(feats, 0), flatten_batch(feats)):
        model = tiny(attn)
        model.train()
        cb = KFACPreconditioner(min_samples=1)
        cb.attach(model)
        cb.begin_micro_batch(token_mask_from_batch(batch))
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss
        loss.backward()
        cb.flush()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        stats = {n: (m.stats.sum_a.clone(), m.stats.sum_g.clone(), int(m.stats.cnt_a)) for n, m in cb._layers.items()}
        results.append((float(loss.detach()), grads, stats))
    (loss_p, grads_p, stats_p), (loss_f, grads_f, stats_f) = results
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 12
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6)
    for name in stats_p:
        assert stats_f[name][2] == stats_p[name][2] == 14
        torch.testing.assert_close(stats_f[name][0], stats_p[name][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats_f[name][1], stats_p[name][1], rtol=1e-4, atol=1e-9)
