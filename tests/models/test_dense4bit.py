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


def _grads(model, ids, mask):
    """Loss, input-embedding gradient and LoRA gradients of one forward/backward of ``model`` (train mode)."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), emb.grad, lora


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_forward_backward_bitwise_bitsandbytes(checkpointing):
    from peft import LoraConfig, get_peft_model

    from fteval.models.loading import load_causal_lm

    base = load_causal_lm("embedded", quantization="nf4", attn_implementation="sdpa").model
    for p in base.parameters():
        p.requires_grad_(False)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B != 0: gradients reach A and the inputs through every layer
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ref = _grads(model, IDS, MASK)
    with dense_4bit_inference(model, grad=True) as n:
        assert n == 30 * 7
        got = _grads(model, IDS, MASK)
        again = _grads(model, IDS, MASK)  # second step on the kept weights
        cached = [dict(layer._fteval_dense_weight) for layer in dense_4bit_layers(model)]
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    assert ref[2].keys() == got[2].keys() and len(ref[2]) == 2 * 2 * 30
    assert all(torch.equal(ref[2][k], got[2][k]) for k in ref[2])
    assert torch.equal(got[0], again[0]) and all(torch.equal(got[2][k], again[2][k]) for k in got[2])
    assert ref[1].abs().sum() > 0 and all(list(c) == [torch.float32] for c in cached)
    after = _grads(model, IDS, MASK)  # bitsandbytes' own path again after the block
    assert torch.equal(ref[1], after[1])
    assert all("forward" not in layer.__dict__ and not hasattr(layer, "_fteval_dense_grad")
               for layer in dense_4bit_layers(model))


def test_grad_path_off_by_default_and_bias_with_gradient_falls_back(nf4):
    layer = dense_4bit_layers(nf4)[0]
    x = torch.randn(2, layer.weight.quant_state.shape[1], requires_grad=True)
    with dense_4bit_inference(nf4, grad=True):
        layer.bias = torch.nn.Parameter(torch.zeros(layer.weight.quant_state.shape[0]))  # a trained bias
        try:
            out = layer(x)
            assert layer._fteval_dense_weight == {}  # bitsandbytes' path: its backward also gives the bias gradient
        finally:
            layer.bias = None
        out.sum().backward()
        assert x.grad is not None
        frozen = layer(x)
        assert list(layer._fteval_dense_weight) == [torch.float32]  # frozen bias: the kept weight
        assert frozen.grad_fn is not None and type(frozen.grad_fn).__name__ == "_DenseMatMul4bitBackward"
