"""Token pooling with padding and attention sinks; layer pooling (mean, last, attention)."""

import pytest
import torch

from fteval.eval.pooling import (
    DEFAULT_SINK_RATIO,
    last_tokens_mask,
    layer_attention_weights,
    layer_reference,
    masked_mean,
    pool_layers,
    pool_over_layers,
    token_keep_mask,
)


def _tokens(lengths, dim=4, seed=0, sink_scale=None):
    """Unpadded token states per prompt, optionally with a massive first token."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        t = torch.randn(n, dim, generator=gen) + 1.0
        if sink_scale is not None:
            t[0] = sink_scale * torch.ones(dim)
        out.append(t)
    return out


def _pad(seqs, side, fill=0.0):
    """Batch [B, T, D] and mask [B, T] with padding on `side`."""
    t_max, dim = max(len(s) for s in seqs), seqs[0].shape[1]
    hidden = torch.full((len(seqs), t_max, dim), fill)
    mask = torch.zeros(len(seqs), t_max, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(0, len(s)) if side == "right" else slice(t_max - len(s), t_max)
        hidden[i, span] = s
        mask[i, span] = 1
    return hidden, mask


@pytest.mark.parametrize("sink", ["none", "first", "auto"])
def test_left_and_right_padding_agree(sink):
    seqs = _tokens([5, 2, 7], sink_scale=200.0)
    right = masked_mean(*_pad(seqs, "right"), sink=sink)
    left = masked_mean(*_pad(seqs, "left"), sink=sink)
    assert torch.allclose(right, left, atol=1e-6)
    skip = 0 if sink == "none" else 1
    expected = torch.stack([s[skip:].mean(dim=0) for s in seqs])
    assert torch.allclose(right, expected, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_tokens_mask_selects_the_end_of_each_prompt(side):
    seqs = _tokens([6, 3, 1], sink_scale=200.0)
    hidden, mask = _pad(seqs, side)
    keep = last_tokens_mask(mask, 2)
    assert keep.sum(dim=1).tolist() == [2, 2, 1]  # a 1-token prompt keeps its one token
    pooled = masked_mean(hidden, keep, sink="none")
    expected = torch.stack([s[-2:].mean(dim=0) for s in seqs])
    assert torch.allclose(pooled, expected, atol=1e-6)
    per_row = last_tokens_mask(mask, torch.tensor([1, 3, 2]))
    assert per_row.sum(dim=1).tolist() == [1, 3, 1]
    assert torch.equal(per_row & (mask == 0), torch.zeros_like(mask))  # never a padding position
    with pytest.raises(ValueError, match=">= 1"):
        last_tokens_mask(mask, 0)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        last_tokens_mask(mask[0], 1)


def test_planted_sink_does_not_dominate_with_first():
    seqs = _tokens([10, 12], sink_scale=150.0)
    hidden, mask = _pad(seqs, "left")
    with_sink = masked_mean(hidden, mask, sink="none")
    without = masked_mean(hidden, mask, sink="first")
    rest = torch.stack([s[1:].mean(dim=0) for s in seqs])
    assert torch.allclose(without, rest, atol=1e-5)
    assert (with_sink.norm(dim=1) > 5 * rest.norm(dim=1)).all()  # the plain mean is the sink's


def test_auto_drops_only_massive_tokens_anywhere():
    seqs = _tokens([8, 8], sink_scale=None)
    seqs[0][3] = 100.0  # a massive token in the middle
    seqs[1][0] = 0.9 * DEFAULT_SINK_RATIO * seqs[1][1:].norm(dim=1).median() / 2.0  # per-dim: norm ~ 0.9x ratio
    hidden, mask = _pad(seqs, "right")
    keep = token_keep_mask(hidden, mask, sink="auto")
    assert keep[0].tolist() == [True, True, True, False, True, True, True, True]
    assert keep[1].all()  # below the threshold: kept
    out = masked_mean(hidden, mask, sink="auto")
    assert torch.allclose(out[0], torch.cat([seqs[0][:3], seqs[0][4:]]).mean(dim=0), atol=1e-5)


def test_one_token_prompt_keeps_its_token():
    seqs = [torch.tensor([[3.0, 4.0]]), torch.tensor([[1.0, 1.0], [5.0, 5.0], [7.0, 7.0]])]
    for sink in ("first", "auto"):
        out = masked_mean(*_pad(seqs, "left"), sink=sink)
        assert out[0].tolist() == [3.0, 4.0]
    assert masked_mean(*_pad(seqs, "left"), sink="first")[1].tolist() == [6.0, 6.0]


def test_nan_at_padding_does_not_leak():
    seqs = _tokens([3, 6])
    hidden, mask = _pad(seqs, "left", fill=float("nan"))
    out = masked_mean(hidden, mask, sink="first")
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0], seqs[0][1:].mean(dim=0), atol=1e-6)


def test_bf16_hidden_states_give_float32():
    hidden, mask = _pad(_tokens([4, 4]), "right")
    out = masked_mean(hidden.to(torch.bfloat16), mask)
    assert out.dtype == torch.float32
    assert torch.allclose(out, masked_mean(hidden, mask), atol=0.05)


def test_pool_layers_stacks_embeddings_and_every_layer():
    gen = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    states = tuple(torch.randn(2, 4, 3, generator=gen) for _ in range(5))  # embeddings + 4 layers
    out = pool_layers(states, mask, sink="first")
    assert out.shape == (2, 5, 3)
    for layer, h in enumerate(states):
        assert torch.allclose(out[:, layer], masked_mean(h, mask, sink="first"))


def test_layer_pooling_mean_last_attention():
    gen = torch.Generator().manual_seed(1)
    n, layers, dim = 6, 3, 16
    reps = torch.randn(n, layers, dim, generator=gen)
    reps[:, 2] += 3.0  # layer 2 has a strong common direction
    assert torch.allclose(pool_over_layers(reps, "mean"), reps.mean(dim=1))
    assert torch.equal(pool_over_layers(reps, "last"), reps[:, -1])

    weights, ref = layer_attention_weights(reps)
    mean = reps.double().mean(dim=0)
    expected_ref = mean / mean.norm(dim=-1, keepdim=True)
    assert torch.allclose(ref, expected_ref)
    scores = torch.stack(
        [torch.stack([reps[i, l].double() @ expected_ref[l] for l in range(layers)]) for i in range(n)]
    ) / dim**0.5
    assert torch.allclose(weights, torch.softmax(scores, dim=1), atol=1e-12)
    assert torch.allclose(weights.sum(dim=1), torch.ones(n, dtype=torch.float64))
    assert (weights.argmax(dim=1) == 2).all()
    pooled = pool_over_layers(reps, "attention")
    manual = (weights[..., None] * reps.double()).sum(dim=1).float()
    assert torch.allclose(pooled, manual, atol=1e-6)
    # a given reference (e.g. from another set) is used as is
    w2, _ = layer_attention_weights(reps, reference=torch.ones(layers, dim) / dim**0.5)
    assert not torch.allclose(w2, weights)


def test_reference_uses_no_labels_and_is_permutation_invariant():
    gen = torch.Generator().manual_seed(2)
    reps = torch.randn(10, 4, 5, generator=gen)
    perm = torch.randperm(10, generator=gen)
    assert torch.allclose(layer_reference(reps), layer_reference(reps[perm]), atol=1e-12)
    assert torch.allclose(pool_over_layers(reps, "attention")[perm], pool_over_layers(reps[perm], "attention"), atol=1e-6)


def test_pooling_errors():
    hidden, mask = _pad(_tokens([3, 2]), "right")
    with pytest.raises(ValueError, match=r"\[batch, seq, hidden\]"):
        masked_mean(hidden[0], mask)
    with pytest.raises(ValueError, match="attention_mask must be"):
        masked_mean(hidden, mask[:, :2])
    with pytest.raises(ValueError, match=r"prompts \[1\] of the batch have no real token"):
        masked_mean(hidden, torch.tensor([[1, 1, 1], [0, 0, 0]]))
    with pytest.raises(ValueError, match="sink must be one of"):
        masked_mean(hidden, mask, sink="last")
    with pytest.raises(ValueError, match="sink_ratio must be > 1"):
        masked_mean(hidden, mask, sink="auto", sink_ratio=0.5)
    with pytest.raises(ValueError, match="non-empty tuple"):
        pool_layers(hidden, mask)
    with pytest.raises(ValueError, match="layer pooling method"):
        pool_over_layers(torch.randn(2, 3, 4), "max")
    with pytest.raises(ValueError, match=r"\[N prompts, L\+1 layers, D\]"):
        pool_over_layers(torch.randn(2, 4), "mean")
    with pytest.raises(ValueError, match="reference must be"):
        layer_attention_weights(torch.randn(2, 3, 4), reference=torch.randn(3, 5))
