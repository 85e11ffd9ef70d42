"""The chunked (fused) loss equals transformers' loss over the full logits, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fteval.data.formatting import flatten_batch, pad_batch
from fteval.models.fused_loss import causal_lm_parts, chunked_linear_cross_entropy, fused_causal_lm_loss
from fteval.grit import inject_grit_layers
from tests.data.test_padding_free import examples


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_chunked_cross_entropy_equals_the_full_one_in_float64(chunk):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(21, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 21, (13,), generator=g)
    labels[[0, 4, 5]] = -100
    got = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(got, (hidden, weight))
    want = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    wh, ww = torch.autograd.grad(want, (hidden, weight))
    # float64 throughout: the two sums differ only in their order (~1e-16 relative)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(gh, wh, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gw, ww, rtol=1e-10, atol=1e-14)
    assert float(chunked_linear_cross_entropy(hidden, weight, torch.full((13,), -100))) == 0.0
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=0)


def _tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg)
    if kind == "grit":
        for layer in inject_grit_layers(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0).values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
        return model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("kind", ["lora", "grit"])
@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_module_loss_and_adapter_gradients_match_the_unfused_loss(kind, layout, one_thread):
    feats = examples()
    batch = pad_batch(feats, 0) if layout == "padded" else flatten_batch(feats)
    results = []
    for fused in (False, True):
        model = _tiny(kind)
        model.train()
        if fused:
            loss = fused_causal_lm_loss(model, batch, "chunked", chunk_tokens=5)
        else:
            kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_u, grads_u), (loss_f, grads_f) = results
    # fp32; the two losses sum the same per-token terms in another order: ~1e-7 relative
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-6, atol=0)
    assert grads_u.keys() == grads_f.keys() and len(grads_u) == 8
    for name in grads_u:  # gradients of O(1e-2..1); fp32 accumulation-order differences ~1e-7 relative
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-4, atol=1e-7)


def test_models_with_other_output_layers_are_refused():
    model = _tiny("grit")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="fused_loss off"):
        causal_lm_parts(model)


def test_liger_without_the_package_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import liger_kernel  # noqa: F401
        pytest.skip("liger-kernel is installed here; the error path cannot be shown")
    except ImportError:
        pass
    model = _tiny("grit")
    batch = pad_batch(examples(), 0)
    with pytest.raises(ValueError, match="pip install liger-kernel"):
        fused_causal_lm_loss(model, batch, "liger")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_gives_the_same_loss_and_gradients(checkpointing, one_thread):
    from fteval.models.offload import offload_activations

    batch = pad_batch(examples(), 0)
    results = []
    for offload in (False, True):
        model = _tiny("lora")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        with offload_activations(offload, min_bytes=256, force_cpu=True) as off:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        off.offloaded_bytes))
    (loss_a, grads_a, none), (loss_b, grads_b, moved) = results
    assert none == 0 and moved > 0  # the hooks ran and moved the saved activations
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)  # copies change no arithmetic: bitwise
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0)
