"""GRIT LoRA layer: forward maths, injection, 4-bit base, peft export round trip, K-FAC artifacts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from fteval.grit import (
    FactorGroup,
    GritLoraLinear,
    RankSpaceStats,
    energy_rank,
    export_grit_adapter,
    grit_layers,
    inject_grit_layers,
    save_kfac_artifacts,
)

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in grit_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


INPUT_IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(5))
EPS32 = 2.0**-24  # fp32 unit round-off


def logits_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Two fp32 implementations of one small network (peft's LoRA layer vs fteval's fused branch):
    each layer's dot products (<= 128 terms) round differently by <~ 128 eps relative to their
    scale, through 2 blocks and the head; allow 1e-4 of the largest logit (the adapters move the
    logits by > 1e-2, asserted where it matters)."""
    torch.testing.assert_close(got, ref, rtol=0.0, atol=1e-4 * float(ref.abs().max()))


# --------------------------------------------------------------------------- layer
def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = GritLoraLinear(base, r=4, alpha=16.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)  # [batch, seq, in]
    torch.testing.assert_close(layer(x), base(x))  # B = 0 at init
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(6, 4, generator=g))
    A, B, W, b = (t.detach().double() for t in (layer.lora_A.weight, layer.lora_B.weight, base.weight, base.bias))
    xd = x.double()
    expected = xd @ W.T + b + 4.0 * (xd @ A.T @ B.T)  # alpha / r = 16 / 4, float64
    # fp32 round-off: each output sums 8 + 4 products of magnitude |x||W| and 4 |x||A||B| (4 = r terms, 8 = d_in)
    scale = xd.abs() @ W.abs().T + b.abs() + 4.0 * (xd.abs() @ A.abs().T @ B.abs().T)
    torch.testing.assert_close(layer(x).double(), expected, rtol=0.0, atol=4 * (8 + 4 + 2) * EPS32 * float(scale.max()))
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base(x))
    rs = GritLoraLinear(nn.Linear(8, 6), r=4, alpha=16.0, use_rslora=True)
    assert rs.scaling == 8.0  # alpha / sqrt(r)
    bound = 1 / math.sqrt(8)  # kaiming_uniform(a=sqrt(5)) bound = 1/sqrt(fan_in)
    a_max = float(A.detach().abs().max())
    assert 0.5 * bound < a_max <= bound


def test_adapter_follows_autocast_and_keeps_fp32_weights():
    """Under bf16 AMP the branch computes in bf16 (as peft's LoRA does); weights and grads stay fp32."""
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(8, 6), r=4, alpha=4.0)
    nn.init.normal_(layer.lora_B.weight)
    dtypes = []
    mm = torch.Tensor.__matmul__

    def spy(a, b):  # the branch's rank-space matmul x A^T
        dtypes.append((a.dtype, b.dtype))
        return mm(a, b)

    x = torch.randn(2, 8)
    torch.Tensor.__matmul__ = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    finally:
        torch.Tensor.__matmul__ = mm
    assert dtypes and all(d == (torch.bfloat16, torch.bfloat16) for d in dtypes) and y.dtype == torch.bfloat16
    assert layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    delta = layer.scaling * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer.base_layer(x)
    # bf16 (eps 2^-8 = 3.9e-3): the branch computed in bf16 and rounded once more; 5 eps of O(1) values
    torch.testing.assert_close(y.float(), (base + delta.to(torch.bfloat16)).float(), rtol=2e-2, atol=2e-2)
    layer.zero_grad()
    y32 = layer(x)  # no autocast: fp32 throughout
    torch.testing.assert_close(y32, layer.base_layer(x) + delta)



def test_branch_gradients_match_autograd_reference():
    """The written-out adapter branch (addmm-fused add) against autograd on the plain formula."""
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(7, 5, dtype=torch.float64), r=3, alpha=6.0, adapter_dtype=torch.float64)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    got = (x.grad.clone(), layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone())
    A = layer.lora_A.weight.detach().clone().requires_grad_()
    B = layer.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    ref = layer.base_layer(x2) + 2.0 * (x2 @ A.T) @ B.T
    torch.testing.assert_close(y, ref)
    (ref * w).sum().backward()
    for g, r in zip(got, (x2.grad, A.grad, B.grad)):
        torch.testing.assert_close(g, r)


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    layer = GritLoraLinear(nn.Linear(8, 6), r=2, alpha=2.0, dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    layer.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert isinstance(GritLoraLinear(nn.Linear(8, 6), r=2, alpha=2.0).lora_dropout, nn.Identity)


def test_wraps_bitsandbytes_linear4bit():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    q = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu")  # quantises the weight (transformers does this when loading a 4-bit model)
    layer = GritLoraLinear(q, r=4, alpha=8.0)
    assert (layer.in_features, layer.out_features) == (64, 32)
    assert layer.lora_A.weight.dtype == torch.float32
    x = torch.randn(3, 64)
    y = layer(x)
    assert y.shape == (3, 32) and float((y - dense(x)).detach().abs().max()) < 0.5  # nf4 quantisation error only
    y.pow(2).sum().backward()
    assert float(layer.lora_B.weight.grad.abs().max()) > 1e-3  # gradient flows through the 4-bit path


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": 2.5}, {"alpha": 0}, {"dropout": 1.0}])
def test_bad_hyperparameters(kwargs):
    args = {"r": 2, "alpha": 2.0, "dropout": 0.0, **kwargs}
    with pytest.raises(ValueError):
        GritLoraLinear(nn.Linear(4, 4), **args)


def test_non_linear_base_is_rejected():
    with pytest.raises(ValueError, match="nn.Linear"):
        GritLoraLinear(nn.Conv1d(2, 2, 1), r=1, alpha=1.0)


# --------------------------------------------------------------------------- injection
def test_inject_replaces_targets_and_freezes_the_rest():
    model = tiny_llama()
    layers = inject_grit_layers(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.0)
    assert sorted(layers) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert grit_layers(model).keys() == layers.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{s}.weight" for n in layers for s in "AB"}
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 4 * (4 * 64 + 64 * 4) - 2 * (
        64 * 4 - 32 * 4
    )  # v_proj has 2 kv heads x 16 = 32 outputs
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in model.state_dict()


def test_inject_errors_name_targets_and_available_linears():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"\['qproj'\].*'q_proj'"):
        inject_grit_layers(model, ["q_proj", "qproj"], r=4, alpha=8, dropout=0.0)
    assert not grit_layers(model)  # nothing replaced on error
    with pytest.raises(ValueError, match="non-empty list"):
        inject_grit_layers(model, "q_proj", r=4, alpha=8, dropout=0.0)
    inject_grit_layers(model, ["q_proj"], r=4, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="already holds GRIT layers"):
        inject_grit_layers(model, ["v_proj"], r=4, alpha=8, dropout=0.0)


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("use_rslora", [False, True])
def test_exported_adapter_reproduces_logits_with_peft(tmp_path, use_rslora):
    from peft import PeftModel

    model = tiny_llama()
    inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.05, use_rslora=use_rslora)
    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=INPUT_IDS).logits
        base_logits = tiny_llama()(input_ids=INPUT_IDS).logits
    assert float((logits - base_logits).abs().max()) > 1e-2  # the adapter matters
    out = export_grit_adapter(model, tmp_path / "adapter", "tiny-llama", TARGETS, 4, 8, 0.05, use_rslora)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["use_rslora"] is use_rslora and cfg["base_model_name_or_path"] == "tiny-llama"
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys and len(keys) == 2 * 5 * 2
    peft_model = PeftModel.from_pretrained(tiny_llama(), out).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=INPUT_IDS).logits
    logits_close(peft_logits, logits)
    assert not list(tmp_path.glob(".adapter.*"))  # no temporary folder left behind


def test_truncated_export_keeps_rank_k_adapters_exact(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    layers = inject_grit_layers(model, TARGETS, r=4, alpha=8, dropout=0.0)
    randomise_adapters(model)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():  # make one layer rank 2 as a one-sided reprojection would
        V = torch.linalg.qr(torch.randn(4, 2, generator=torch.Generator().manual_seed(2))).Q
        layers[name].lora_A.weight.copy_(V @ V.T @ layers[name].lora_A.weight)
        logits = model(input_ids=INPUT_IDS).logits
    out = export_grit_adapter(model, tmp_path / "a", "tiny", TARGETS, 4, 8, 0.0, truncate_to_effective_rank={name: 2})
    tensors = load_file(out / "adapter_model.safetensors")
    assert tensors[f"base_model.model.{name}.lora_A.weight"].shape == (2, 64)
    assert tensors[f"base_model.model.{name}.lora_B.weight"].shape == (64, 2)
    peft_model = PeftModel.from_pretrained(tiny_llama(), out).eval()
    assert peft_model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)
    with torch.no_grad():
        logits_close(peft_model(input_ids=INPUT_IDS).logits, logits)


def test_export_rejects_inconsistent_arguments(tmp_path):
    model = tiny_llama()
    inject_grit_layers(model, ["q_proj"], r=4, alpha=8, dropout=0.0)
    with pytest.raises(ValueError, match="r=4, alpha=8.0"):
        export_grit_adapter(model, tmp_path / "x", "tiny", ["q_proj"], 8, 8, 0.0)
    with pytest.raises(ValueError, match="unknown GRIT layers"):
        export_grit_adapter(
            model, tmp_path / "x", "tiny", ["q_proj"], 4, 8, 0.0, truncate_to_effective_rank={"lm_head": 2}
        )
    with pytest.raises(ValueError, match="no GRIT layers"):
        export_grit_adapter(tiny_llama(), tmp_path / "x", "tiny", ["q_proj"], 4, 8, 0.0)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- statistics and artifacts
def test_factor_group_running_mean_then_ema_and_state():
    """The arithmetic training runs: FactorGroup.accumulate adds a step's Gram sums, fold merges them."""
    layer = GritLoraLinear(nn.Linear(6, 4), r=2, alpha=2.0)
    group = FactorGroup([""], [layer], rank=2, ema_decay=0.9)
    st, row = layer.stats, torch.tensor([0])
    g = torch.Generator().manual_seed(3)
    u1, u2, u3 = torch.randn(5, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(4, 2, generator=g)
    mask = torch.tensor([True, False, True, True, False])

    def add(side, u, mask=None):  # one step's tensors of the single layer, [1, tokens, r]
        weights, count = (None, None) if mask is None else (mask.float(), mask.sum())
        group.accumulate(row, side, u[None], weights, count, 1.0)

    add(0, u1, mask)
    group.fold(st.ema_decay)
    add(0, u2)
    group.fold(st.ema_decay)
    both = torch.cat([u1[mask], u2])
    # fp32 Grams of <= 6 tokens and two folds: round-off <= ~16 eps of |u|^T |u| (see tests/callbacks/test_kfac.py)
    tol = 16 * 6 * EPS32 * float(torch.cat([both, u3]).abs().pow(2).sum(0).max())
    bd = both.double()
    torch.testing.assert_close(st.S_a.double(), bd.T @ bd / 6, rtol=0.0, atol=tol)  # token-weighted running mean
    assert st.n_a == 6 and float(st.sum_a.abs().max()) == 0.0
    st.ema_a = True
    group.sync_ema()  # the refresh that first uses a side switches it to the EMA this way
    add(0, u3)
    group.fold(st.ema_decay)
    u3d = u3.double()
    torch.testing.assert_close(st.S_a.double(), 0.9 * bd.T @ bd / 6 + 0.1 * u3d.T @ u3d / 4, rtol=0.0, atol=tol)
    add(1, torch.full((2, 2), float("inf")))
    group.fold(st.ema_decay)  # an overflow step is dropped
    assert st.n_g == 0 and float(st.S_g.abs().max()) == 0.0 and group.take_dropped()
    clone = RankSpaceStats(2, "cpu")
    clone.load_state_dict(st.state_dict())
    assert torch.equal(clone.S_a, st.S_a) and clone.n_a == 10 and clone.ema_a and clone.ema_decay == 0.9
    with pytest.raises(ValueError, match="rank"):
        RankSpaceStats(3, "cpu").load_state_dict(st.state_dict())


def test_energy_rank():
    ev = torch.tensor([1.0, 5.0, 3.0, 1.0])  # sorted 5, 3, 1, 1 of 10: cumulative 0.5, 0.8, 0.9, 1.0
    assert [energy_rank(ev, t) for t in (0.5, 0.51, 0.8, 0.85, 0.9, 1.0)] == [1, 2, 2, 3, 3, 4]
    assert energy_rank(ev, 0.5, min_rank=2) == 2 and energy_rank(ev, 1.0, max_rank=3) == 3
    assert energy_rank(torch.zeros(4), 0.9) == 1


def test_save_kfac_artifacts(tmp_path):
    model = tiny_llama()
    layers = inject_grit_layers(model, ["q_proj"], r=4, alpha=8, dropout=0.0)
    randomise_adapters(model)
    for i, layer in enumerate(layers.values()):
        layer.stats = RankSpaceStats(4, "cpu")
        layer.stats.S_a = torch.diag(torch.tensor([8.0, 1.0, 0.5, 0.5]))  # energy 0.8 at k=1, 0.9 at k=2
        X = torch.randn(6, 4, generator=torch.Generator().manual_seed(10 + i))
        layer.stats.S_g = X.T @ X
        layer.stats.n_a, layer.stats.n_g = 100 + i, 50
    out = save_kfac_artifacts(layers, tmp_path / "art", effective_ranks={"model.layers.0.self_attn.q_proj": 3})
    tensors = load_file(out / "kfac_factors.safetensors")
    name = "model.layers.1.self_attn.q_proj"
    ev, V = tensors[f"{name}.eigvals_g"], tensors[f"{name}.eigvecs_g"]
    assert bool((ev[:-1] >= ev[1:]).all())  # descending
    # fp32 eigh: backward error ~ r eps ||S|| (r = 4); allow 64 r eps of the largest entry
    S_g = layers[name].stats.S_g
    torch.testing.assert_close(V @ torch.diag(ev) @ V.T, S_g, rtol=0.0, atol=64 * 4 * EPS32 * float(S_g.abs().max()))
    report = json.loads((out / "effective_rank.json").read_text())
    expected = {"r": 4, "n_a": 101, "n_g": 50, "energy_rank": 2, "effective_rank": 2, "adapter_rank": 4}
    assert report["layers"][name] == expected
    assert report["layers"]["model.layers.0.self_attn.q_proj"]["effective_rank"] == 3
    assert report["mean_effective_rank"] == 2.5
    with pytest.raises(ValueError, match="attach a fteval.grit.KFAC"):
        save_kfac_artifacts(inject_grit_layers(tiny_llama(), ["q_proj"], r=2, alpha=2, dropout=0.0), tmp_path / "n")
