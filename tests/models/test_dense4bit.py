"""Dequantise-once evaluation forwards of a CPU 4-bit base: bitwise bitsandbytes' outputs, gradients untouched."""

from __future__ import annotations

import pytest
import torch

from fteval.models.dense4bit import dense_4bit_inference, dense_4bit_layers, dense_bytes, fits_in_memory

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30, 2, 2], [0, 0, 1, 504, 9202, 314, 260, 30, 2]])  # left-padded
MASK = (IDS != 0).long()


@pytest.fixture(scope="module")
def nf4():
    from fteval.models.loading import load_causal_lm

    return load_causal_lm("embedded", quantization="nf4", attn_implementation="sdpa").model.eval()


def test_outputs_and_generation_are_bitwise_bitsandbytes(nf4):
    with torch.no_grad():
        ref = nf4(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
        ref_gen = nf4.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with dense_4bit_inference(nf4) as n:
            assert n == len(dense_4bit_layers(nf4)) == 30 * 7  # every projection of the 30 blocks
            got = nf4(input_ids=IDS, attention_mask=MASK, output_hidden_states=True)
            got_gen = nf4.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0)
            cached = [layer._fteval_dense_weight for layer in dense_4bit_layers(nf4)]
    assert all(torch.equal(a, b) for a, b in zip(ref.hidden_states, got.hidden_states))
    assert torch.equal(ref.logits, got.logits)
    assert torch.equal(ref_gen, got_gen)
    assert all(list(c) == [torch.float32] for c in cached)  # one dense copy per layer, made once
    # on leaving, bitsandbytes' own forward is back and the copies are gone
    assert all("forward" not in layer.__dict__ and not hasattr(layer, "_fteval_dense_weight")
               for layer in dense_4bit_layers(nf4))


def test_dense_weight_is_the_dequantised_weight(nf4):
    import bitsandbytes.functional as bf

    layer = dense_4bit_layers(nf4)[0]
    x = torch.randn(3, layer.weight.quant_state.shape[1])
    with torch.no_grad(), dense_4bit_inference(nf4):
        y = layer(x)
        w = layer._fteval_dense_weight[torch.float32]
    torch.testing.assert_close(w, bf.dequantize_4bit(layer.weight.data, layer.weight.quant_state), rtol=0, atol=1e-6)
    assert torch.equal(y, torch.nn.functional.linear(x, w))


def test_forwards_with_gradients_take_bitsandbytes_path(nf4):
    layer = dense_4bit_layers(nf4)[0]
    x = torch.randn(2, layer.weight.quant_state.shape[1], requires_grad=True)
    ref = layer(x)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    with dense_4bit_inference(nf4):
        out = layer(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert layer._fteval_dense_weight == {}  # no copy made for a forward that needs gradients
    assert torch.equal(out, ref) and torch.equal(g, g_ref)


def test_memory_guard(nf4):
    n_weights = sum(int(torch.Size(m.weight.quant_state.shape).numel()) for m in dense_4bit_layers(nf4))
    assert dense_bytes(nf4) == 4 * n_weights  # fp32 compute dtype
    assert 100e6 < n_weights < 135e6  # the 7 projections of 30 blocks of SmolLM2-135M
    assert fits_in_memory(nf4)
    assert not fits_in_memory(nf4, fraction=1e-6)
    assert not fits_in_memory(torch.nn.Linear(4, 4))  # nothing to dequantise
