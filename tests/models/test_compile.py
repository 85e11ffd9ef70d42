"""compile_blocks: torch.compile on every transformer block, with the same numbers as eager."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from callbacks.kfac import KFACPreconditioner
from fteval.models.base import compile_blocks, transformer_blocks
from fteval.grit import inject_grit_layers
from fteval.models.qlora import QLoRAModule

TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, use_cache=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def test_transformer_blocks_are_the_decoder_layers_also_inside_peft():
    from peft import LoraConfig, get_peft_model

    model = tiny(layers=3)
    assert [type(b).__name__ for b in transformer_blocks(model)] == ["LlamaDecoderLayer"] * 3
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    blocks = transformer_blocks(peft_model)
    assert blocks == list(model.model.layers)


def test_a_model_without_blocks_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"declares no transformer blocks.*compile_blocks: false"):
        compile_blocks(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


def test_missing_cpu_compiler_is_reported_before_training(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"needs a C\+\+ compiler.*compile_blocks: false"):
        compile_blocks(tiny())


def test_module_option_compiles_every_block_and_keeps_parameter_names():
    module = QLoRAModule(quantization="none", r=4, alpha=8, target_modules=("q_proj", "v_proj"), compile_blocks=True)
    base = tiny()
    names_before = {n for n, _ in base.named_parameters()}
    module.setup_base_model(base)
    blocks = transformer_blocks(module.model)
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    # nn.Module.compile works in place: no `_orig_mod.` in names, so checkpoints and adapters keep their keys
    names_after = {n.replace("base_model.model.", "").replace(".base_layer", "") for n, _ in module.model.named_parameters()}
    assert names_before <= names_after and not any("_orig_mod" in n for n in names_after)


def _grit_step(compiled: bool, batches: list[dict], checkpointing: bool, told: str = "mask") -> tuple[float, dict, dict]:
    model = tiny()
    layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
    for layer in layers.values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    if checkpointing:  # forward runs twice per micro-batch: statistics must still count it once
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if compiled:
        assert len(compile_blocks(model)) == 2
    cb = KFACPreconditioner(min_samples=1)
    cb.attach(model)
    losses = []
    for batch in batches:  # several micro-batches: the once-per-micro-batch flag is re-armed and read again
        # told the mask or the token shape, the callback sizes the compiled layers' leaves; told
        # neither, compiled layers fall back to the fteval::grit_record op
        mask = batch["attention_mask"] if told == "mask" else None
        cb.begin_micro_batch(mask, token_shape=batch["input_ids"].shape if told == "shape" else None)
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss.detach()))
    cb.flush()
    leaves = [m.kfac_leaf for m in layers.values()]
    if compiled and told != "nothing":
        tokens = batches[-1]["input_ids"].numel()
        assert all(leaf is not None and leaf.shape == (2, tokens, 4) and leaf.grad is None for leaf in leaves)
    else:
        assert all(leaf is None for leaf in leaves)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    stats = {n: (m.stats.sum_a.clone(), m.stats.sum_g.clone(), int(m.stats.cnt_a), int(m.stats.cnt_g))
             for n, m in layers.items()}
    return losses, grads, stats


@pytest.mark.parametrize("checkpointing,told", [(False, "mask"), (True, "mask"), (True, "shape"), (True, "nothing")])
def test_compiled_grit_blocks_match_eager_loss_gradients_and_kfac_statistics(checkpointing, told, one_thread):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # three padding tokens: statistics count 21 real tokens per micro-batch
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    loss_e, grads_e, stats_e = _grit_step(False, [batch, batch], checkpointing, told)
    torch._dynamo.reset()
    loss_c, grads_c, stats_c = _grit_step(True, [batch, batch], checkpointing, told)
    torch._dynamo.reset()
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) == 12
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    for name, (sa, sg, ca, cg) in stats_e.items():
        n = 42 if told == "mask" else 48  # two micro-batches of 21 real tokens, or all 24 tokens each
        assert (ca, cg) == (n, n) and stats_c[name][2:] == (n, n)
        assert float(sg.abs().sum()) > 0  # v reached the statistics under compile too
        torch.testing.assert_close(stats_c[name][0], sa, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats_c[name][1], sg, rtol=1e-4, atol=1e-8)


def test_kfac_callback_sizes_compiled_layers_slots_from_the_batch_and_only_theirs():
    from types import SimpleNamespace

    model = tiny()
    layers = inject_grit_layers(model, TARGETS, r=4, alpha=8)
    compiled = [name for name in layers if ".layers.0." in name]
    for name in compiled:  # what compile_blocks marks; the second block stays eager
        layers[name].in_compiled_block = True
    cb = KFACPreconditioner()
    cb.attach(model)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace())  # no grad scaler
    batch = {"input_ids": torch.zeros(3, 5, dtype=torch.long)}  # no labels or mask: the shape comes from input_ids
    cb.on_train_batch_start(trainer, None, batch, 0)
    slots = {name: m.kfac_leaf for name, m in layers.items()}
    assert len(compiled) == 3
    for name, leaf in slots.items():
        if name in compiled:  # [2, tokens, r] with no storage behind it
            assert leaf.shape == (2, 15, 4) and leaf.stride() == (0, 0, 0) and leaf.requires_grad
        else:
            assert leaf is None
    cb.on_train_batch_start(trainer, None, batch, 1)  # same shape: the same slots are kept
    assert all(layers[n].kfac_leaf is slots[n] for n in compiled)
    cb.on_train_batch_start(trainer, None, {"input_ids": torch.zeros(2, 7, dtype=torch.long)}, 2)
    assert all(layers[n].kfac_leaf.shape == (2, 14, 4) for n in compiled)
    cb.detach()
    assert all(m.kfac_leaf is None for m in layers.values())


def test_compiled_grit_statistics_follow_changing_batch_shapes(one_thread):
    """Padded batches change length between micro-batches: the slots are resized, the blocks recompile."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for seq, pad in ((12, 3), (9, 2), (12, 0)):
        ids = torch.randint(3, 128, (2, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq - pad:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    loss_e, grads_e, stats_e = _grit_step(False, batches, True)
    torch._dynamo.reset()
    loss_c, grads_c, stats_c = _grit_step(True, batches, True)
    torch._dynamo.reset()
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6)
    for name, (sa, sg, ca, cg) in stats_e.items():
        assert (ca, cg) == (61, 61) and stats_c[name][2:] == (61, 61)  # attention-mask tokens: 21 + 16 + 24
        torch.testing.assert_close(stats_c[name][0], sa, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats_c[name][1], sg, rtol=1e-4, atol=1e-8)


def test_compiled_grit_hands_bf16_pairs_over_under_bf16_autocast(one_thread):
    """Under bf16 autocast u and du are bf16: the slots take them as they are (half the memory of fp32)."""
    from types import SimpleNamespace

    from callbacks.kfac import _precision_dtype

    assert _precision_dtype(SimpleNamespace(precision="bf16-mixed")) is torch.bfloat16
    assert _precision_dtype(SimpleNamespace(precision="16-mixed")) is torch.float16
    assert _precision_dtype(SimpleNamespace(precision="32-true")) is torch.float32
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (2, 12), generator=g)
    batch = {"input_ids": ids, "labels": ids}
    stats, pair_dtypes = {}, set()
    for compiled in (False, True):
        model = tiny()
        layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
        for layer in layers.values():
            nn.init.normal_(layer.lora_B.weight, std=0.05)
        model.train()
        if compiled:
            compile_blocks(model)
        cb = KFACPreconditioner(min_samples=1)
        cb.attach(model)
        cb.begin_micro_batch(None, token_shape=ids.shape, slot_dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        if compiled:
            pair_dtypes = {m.kfac_leaf.grad.dtype for m in layers.values()}
        cb.flush()
        stats[compiled] = {n: (m.stats.sum_a.clone(), m.stats.sum_g.clone(), int(m.stats.cnt_a)) for n, m in layers.items()}
        torch._dynamo.reset()
    assert pair_dtypes == {torch.bfloat16}
    for name, (sa, sg, ca) in stats[False].items():
        assert ca == 24 and stats[True][name][2] == 24
        assert sa.dtype == torch.float32 and float(sg.abs().sum()) > 0
        # eager and compiled bf16 kernels round differently: bf16-level agreement
        torch.testing.assert_close(stats[True][name][0], sa, rtol=2e-2, atol=1e-2)
        torch.testing.assert_close(stats[True][name][1], sg, rtol=5e-2, atol=1e-6)
