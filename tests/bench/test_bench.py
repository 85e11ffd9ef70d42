"""fteval.bench on CPU at tiny shapes: the training benchmark's runs and ratios, the FLOP/MFU formula,
the random-weight 4-bit builder, the evaluation benchmark, and input errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fteval.bench.common import (
    build_random_model,
    flops_per_token,
    format_table,
    llama_config,
    mfu,
    timing_summary,
)
from fteval.bench.eval import _extraction_batches, bench_eval, synthetic_embeddings
from fteval.bench.train import bench_train
from fteval.bench.train_runs import strip_adapters


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ formula


def test_flops_and_mfu_by_hand():
    n = 8_030_261_248  # Meta-Llama-3-8B
    f = flops_per_token(n, num_layers=32, attn_width=4096, seq_len=1024)
    assert f["dense"] == 4 * n == 32_121_044_992
    assert f["attention"] == 6 * 32 * 1024 * 4096 == 805_306_368
    assert f["total"] == 32_926_351_360
    # the H200 reference rows: tokens/s -> MFU (vs 790 TFLOP/s), to its two decimals
    assert mfu(9798, f["total"]) == pytest.approx(9798 * 32_926_351_360 / 790e12)
    assert round(mfu(9798, f["total"]), 2) == 0.41
    assert round(mfu(6527, f["total"]), 2) == 0.27
    assert round(mfu(2231, f["total"]), 2) == 0.09
    assert mfu(1000.0, 1e9, peak_flops=1e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        flops_per_token(0, 32, 4096, 1024)


def test_llama3_8b_config_has_8_03b_parameters():
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config("llama3-8b"))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248
    cfg = llama_config("llama3-8b")
    assert (cfg.num_key_value_heads, cfg.intermediate_size, cfg.rope_parameters["rope_theta"]) == (8, 14336, 500000.0)


def test_tiny_deep_has_llama3_8b_layer_count_at_tiny_width():
    from transformers import AutoModelForCausalLM

    tiny, deep = llama_config("tiny"), llama_config("tiny-deep")
    assert deep.num_hidden_layers == 32 == llama_config("llama3-8b").num_hidden_layers
    assert (deep.hidden_size, deep.intermediate_size, deep.vocab_size) == (tiny.hidden_size, tiny.intermediate_size, 512)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(deep)
    per_block = 4 * 64 * 64 // 2 + 2 * 64 * 64 // 2 + 3 * 64 * 128 + 2 * 64  # q,o 64x64; k,v 64x32; mlp; 2 norms
    assert sum(p.numel() for p in model.parameters()) == 2 * 512 * 64 + 64 + 32 * per_block


def test_timing_summary_and_table():
    t = timing_summary([0.1, 0.3, 0.2])
    assert t["mean_ms"] == pytest.approx(200.0) and t["p50_ms"] == pytest.approx(200.0)
    assert t["min_ms"] == pytest.approx(100.0) and t["std_ms"] == pytest.approx(100.0)
    text = format_table([{"a": 1.23456, "b": None}], (("a", "A", ".2f"), ("b", "B", "")))
    assert text.splitlines()[2].split() == ["1.23", "-"]


# ----------------------------------------------------------------------------- model builder


def test_random_nf4_model_quantises_all_projections_but_lm_head():
    import bitsandbytes as bnb

    full = build_random_model("tiny", quantization="none", seed=3)
    quant = build_random_model("tiny", quantization="nf4", seed=3)
    assert quant.quantized_layers == 14 and quant.n_params == full.n_params == 139_584
    assert isinstance(quant.model.lm_head, torch.nn.Linear) and not isinstance(quant.model.lm_head, bnb.nn.Linear4bit)
    layer = quant.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4"
    w = full.model.model.layers[0].mlp.up_proj.weight  # same seed: the weight nf4 was made from
    deq = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    err = float((deq - w).norm() / w.norm())
    assert 0.01 < err < 0.15  # really 4-bit, and close
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        a, b = full.model(input_ids=x).logits, quant.model(input_ids=x).logits
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95
    assert not any(p.requires_grad for p in quant.model.parameters())


def test_strip_adapters_restores_the_bare_base():
    from peft import LoraConfig, get_peft_model

    from fteval.grit import inject_grit_layers

    bm = build_random_model("tiny", quantization="nf4")
    before = [type(m).__name__ for m in bm.model.modules()]
    peft_model = get_peft_model(bm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert strip_adapters(bm.model) == 4
    assert [type(m).__name__ for m in bm.model.modules()] == before
    assert not hasattr(bm.model, "peft_config") and not bm.model.is_gradient_checkpointing
    inject_grit_layers(bm.model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], r=4,
                       alpha=8.0)
    assert strip_adapters(bm.model) == 14
    assert [type(m).__name__ for m in bm.model.modules()] == before


# ------------------------------------------------------------------------------ bench train


def test_bench_train_tiny_all_methods(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora", "grit"], batch_sizes=[2], seq_len=16,
                     gradient_checkpointing=[True], steps=2, warmup=1, quantization="nf4", output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"plain", "qlora", "grit"}
    f = data["flops_per_token"]
    assert f["total"] == 4 * 139_584 + 6 * 2 * 16 * 64
    for r in runs.values():
        assert r["error"] is None
        assert len(r["step_ms_all"]) == 2 and all(t > 0 for t in r["step_ms_all"])
        assert r["tokens_per_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (sum(r["step_ms_all"]) / 2 / 1000.0))
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * f["total"] / 790e12)
        assert r["trainable_params"] == 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)  # r x (in + out), 7 targets
        assert r["peak_mem_gib"] is None  # no per-run peak on the CPU
    # same base model, same batches, B = 0 at the start: every method's first loss is the base model's
    assert runs["qlora"]["loss_first"] == pytest.approx(runs["plain"]["loss_first"], abs=1e-5)
    assert runs["grit"]["loss_first"] == pytest.approx(runs["plain"]["loss_first"], abs=1e-5)
    assert math.log(512) - 0.5 < runs["plain"]["loss_first"] < math.log(512) + 0.5  # random weights: ~ln(vocab)
    g = runs["grit"]
    assert g["kfac_refresh_ms"] >= 0 and g["reprojection_ms"] > 0 and g["update_freq"] == 20
    assert g["amortised_step_ms"] == pytest.approx(g["step_p50_ms"] + g["kfac_refresh_ms"] / 20 + g["reprojection_ms"] / 40)
    (cmp,) = data["comparisons"]
    assert cmp["qlora_vs_plain_step_mean"] == pytest.approx(runs["qlora"]["step_mean_ms"] / runs["plain"]["step_mean_ms"])
    assert cmp["grit_vs_qlora_step_p50"] == pytest.approx(runs["grit"]["step_p50_ms"] / runs["qlora"]["step_p50_ms"])
    assert cmp["grit_vs_qlora_amortised"] == pytest.approx(g["amortised_step_ms"] / runs["qlora"]["step_p50_ms"])
    assert cmp["qlora_target_met"] == (cmp["qlora_vs_plain_step_mean"] <= 1.03)
    assert data["machine"]["packages"]["torch"] and data["model"]["quantized_layers"] == 14
    assert data["settings"]["gc_freeze"] is True and all(r["gc_freeze"] for r in runs.values())
    printed = capsys.readouterr().out
    assert "qlora/plain step" in printed and "tokens/s" in printed



def test_bench_train_qdora_and_lora_beside_qlora(tmp_path, capsys):
    """Every registered method runs in the bench; the ratios cover every pair (full-precision base: lora needs it)."""
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora", "qdora", "lora"], batch_sizes=[1], seq_len=8,
                     gradient_checkpointing=[False], steps=2, warmup=1, quantization="none", output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"plain", "qlora", "qdora", "lora"} and all(r["error"] is None for r in runs.values())
    lora_params = 2 * 16 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    assert runs["lora"]["trainable_params"] == runs["qlora"]["trainable_params"] == lora_params
    # DoRA adds one magnitude per output row of each adapted layer: 2 layers x (q, k, v, o, gate, up, down) outputs
    assert runs["qdora"]["trainable_params"] == lora_params + 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    for m in ("qlora", "qdora", "lora"):  # B = 0 at the start: the base model's loss (DoRA's m = ||W|| at init)
        assert runs[m]["loss_first"] == pytest.approx(runs["plain"]["loss_first"], abs=1e-4)
    (cmp,) = data["comparisons"]
    for num, den in (("qlora", "plain"), ("qdora", "plain"), ("lora", "plain"), ("qdora", "qlora"), ("lora", "qlora"),
                     ("lora", "qdora")):
        assert cmp[f"{num}_vs_{den}_step_mean"] == pytest.approx(runs[num]["step_mean_ms"] / runs[den]["step_mean_ms"])
    assert not any(k.startswith(("qlora_vs_qdora", "qlora_vs_lora", "qdora_vs_lora")) for k in cmp)  # one order a pair
    printed = capsys.readouterr().out
    assert "lora/qdora_step_mean" in printed

def test_bench_train_ragged_lengths_padded_vs_padding_free(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora"], batch_sizes=[3], seq_len=24, min_seq_len=6,
                     gradient_checkpointing=[False], padding_free=[False, True], steps=2, warmup=1,
                     quantization="none", output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {(r["method"], r["padding_free"]): r for r in data["runs"]}
    assert len(runs) == 4 and all(r["error"] is None for r in runs.values())
    from fteval.bench.train_runs import SyntheticLM

    ds = SyntheticLM(9, 24, 512, seed=0, min_len=6)
    assert all(6 <= n <= 24 for n in ds.lengths) and len(set(ds.lengths)) > 1
    real = sum(ds.lengths[3:]) / 2  # the two timed batches (after one warm-up batch)
    for r in runs.values():
        assert r["tokens_per_step"] == pytest.approx(real)  # real tokens, padding not counted
        assert r["tokens_per_s"] == pytest.approx(real / (sum(r["step_ms_all"]) / 2 / 1000.0))
    # the same real tokens enter the loss either way: first losses agree
    for m in ("plain", "qlora"):
        assert runs[(m, True)]["loss_first"] == pytest.approx(runs[(m, False)]["loss_first"], rel=1e-4)
    flat = next(c for c in data["comparisons"] if c["padding_free"])
    assert flat["qlora_padding_free_speedup"] == pytest.approx(
        runs[("qlora", True)]["tokens_per_s"] / runs[("qlora", False)]["tokens_per_s"])
    assert "qlora pf/padded" in capsys.readouterr().out


def test_bench_train_repeats_report_the_median_run_and_paired_ratios(tmp_path, capsys):
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora", "grit"], batch_sizes=[1], seq_len=8,
                     gradient_checkpointing=[False], steps=2, warmup=1, quantization="none", repeats=3, output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["settings"]["repeats"] == 3 and len(data["runs"]) == 3
    for r in data["runs"]:
        means = r["repeat_step_mean_ms"]
        assert r["repeats"] == 3 and len(means) == 3 and len(r["repeat_step_p50_ms"]) == 3
        assert r["step_mean_ms"] == sorted(means)[1]  # the median repeat is the one reported
    (cmp,) = data["comparisons"]
    runs = {r["method"]: r for r in data["runs"]}
    assert cmp["qlora_vs_plain_step_mean"] == pytest.approx(runs["qlora"]["step_mean_ms"] / runs["plain"]["step_mean_ms"])
    # within each repeat, then the median: the target is judged on that
    paired = [q / p for q, p in zip(runs["qlora"]["repeat_step_mean_ms"], runs["plain"]["repeat_step_mean_ms"])]
    assert cmp["qlora_vs_plain_paired"] == pytest.approx(paired)
    assert cmp["qlora_vs_plain_paired_median"] == pytest.approx(sorted(paired)[1])
    assert cmp["qlora_target_met"] == (sorted(paired)[1] <= 1.03)
    grit = [g / q for g, q in zip(runs["grit"]["repeat_amortised_step_ms"], runs["qlora"]["repeat_step_p50_ms"])]
    assert len(grit) == 3 and cmp["grit_vs_qlora_amortised_paired_median"] == pytest.approx(sorted(grit)[1])
    assert cmp["grit_target_met"] == (sorted(grit)[1] <= 1.10)
    # the order rotates every repeat, so no method always runs last
    order = [line.split()[2].rstrip(":") for line in capsys.readouterr().out.splitlines()
             if line.startswith("[fteval bench] ") and ", repeat " in line]
    assert order == ["plain", "qlora", "grit", "qlora", "grit", "plain", "grit", "plain", "qlora"]


def test_bench_train_compiled_blocks_same_losses_no_graph_breaks(tmp_path, capsys, one_thread):
    from torch._dynamo.utils import counters

    counters["graph_break"]["left by an earlier compile in this process"] += 6  # must not be counted
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "grit"], batch_sizes=[1], seq_len=8,
                     gradient_checkpointing=[False], compile_blocks=[False, True], steps=2, warmup=2,
                     quantization="none", output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {(r["method"], r["compile_blocks"]): r for r in data["runs"]}
    assert len(runs) == 4 and all(r["error"] is None for r in runs.values())
    for m in ("plain", "grit"):
        assert runs[(m, True)]["graph_breaks"] == 0  # GRIT's statistics do not split the compiled blocks
        assert runs[(m, True)]["loss_first"] == pytest.approx(runs[(m, False)]["loss_first"], rel=1e-5)
        assert "graph_breaks" not in runs[(m, False)]
    compiled = next(c for c in data["comparisons"] if c["compile_blocks"])
    assert compiled["grit_compile_speedup"] == pytest.approx(
        runs[("grit", True)]["tokens_per_s"] / runs[("grit", False)]["tokens_per_s"])
    assert "grit compiled/eager" in capsys.readouterr().out


def test_bench_train_cuda_graph_path_same_losses(tmp_path, capsys, one_thread):
    """On a CPU the cuda_graph runs take the graphs' path without capture: the same losses, its ratio row."""
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora", "grit"], batch_sizes=[2], seq_len=8,
                     gradient_checkpointing=[True], cuda_graph=[False, True], steps=2, warmup=3,
                     quantization="none", output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {(r["method"], r["cuda_graph"]): r for r in data["runs"]}
    assert len(runs) == 6 and all(r["error"] is None for r in runs.values())
    for m in ("plain", "qlora", "grit"):
        for key in ("loss_first", "loss_last"):
            assert runs[(m, True)][key] == pytest.approx(runs[(m, False)][key], abs=1e-6)
    graphed = next(c for c in data["comparisons"] if c["cuda_graph"])
    assert graphed["qlora_cuda_graph_speedup"] == pytest.approx(
        runs[("qlora", True)]["tokens_per_s"] / runs[("qlora", False)]["tokens_per_s"])
    assert data["settings"]["cuda_graph"] == [False, True] and "qlora graph/eager" in capsys.readouterr().out


def test_bench_train_profile_plain(tmp_path):
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain"], batch_sizes=[1], seq_len=8, gradient_checkpointing=[False],
                     steps=1, warmup=1, quantization="none", output=out, profile=True, profile_method="plain",
                     profile_steps=2)
    assert rc == 0
    prof = json.loads(out.read_text())["profile"]
    assert prof["method"] == "plain" and prof["steps_profiled"] == 2 and prof["sort_by"] == "self CPU time"
    assert 1 <= len(prof["top"]) <= 20
    assert sum(r["percent"] for r in prof["top"]) <= 100.0 + 1e-6
    assert prof["top"][0]["self_ms_per_step"] >= prof["top"][-1]["self_ms_per_step"]
    assert prof["categories_ms_per_step"].get("matmul", 0) > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"model_config": "gpt-9"}, "model_config='gpt-9'"),
        ({"steps": 0}, "steps=0"),
        ({"warmup": 0}, "warmup=0"),
        ({"methods": ["plain", "sft"]}, "methods="),
        ({"methods": ["plain", "lora"], "quantization": "nf4"}, "methods ['lora'] train on a full-precision base"),
        ({"batch_sizes": [0]}, "batch_sizes="),
        ({"seq_len": 4096}, "seq_len=4096"),
        ({"quantization": "int3"}, "quantization='int3'"),
        ({"min_seq_len": 0}, "min_seq_len=0"),
        ({"padding_free": []}, "padding_free is empty"),
        ({"compile_blocks": []}, "compile_blocks is empty"),
        ({"repeats": 0}, "repeats=0"),
        ({"cuda_graph": []}, "cuda_graph is empty"),
        ({"cuda_graph": [True], "activation_offload": [True]}, "cuda_graph and activation_offload"),
        ({"cuda_graph": [True], "min_seq_len": 4}, "cuda_graph replays batches of a repeated shape"),
        ({"profile": True, "profile_method": "grit", "methods": ["plain"]}, "profile_method='grit'"),
    ],
)
def test_bench_train_rejects_bad_input(tmp_path, kwargs, match):
    args = {"model_config": "tiny", "output": tmp_path / "x.json", **kwargs}
    with pytest.raises(ValueError, match=match.replace("[", r"\[")):
        bench_train(**args)
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------- bench eval


def test_bench_eval_small(tmp_path):
    from fteval.eval.bootstrap import paired_bootstrap_deltas

    out = tmp_path / "eval.json"
    rc = bench_eval(embed_dim=32, n_prompts=40, n_resamples=20, extraction_model="tiny", n_extract=6,
                    extract_batch_size=4, extract_prompt_tokens=8, repeats=1, output=out)
    assert rc == 0
    data = json.loads(out.read_text())
    (cpu,) = data["statistics"]
    assert cpu["device"] == "cpu"
    for stage in ("cluster_scores_x2", "paired_bootstrap", "bootstrap_cis_x2", "silhouette_x2"):
        assert cpu[stage]["median_s"] > 0
    assert cpu["aqi_plus_bootstrap_s"] == pytest.approx(cpu["cluster_scores_x2"]["median_s"] + cpu["paired_bootstrap"]["median_s"])
    base, tuned, labels = synthetic_embeddings(40, 32, 0)
    expected = paired_bootstrap_deltas(base, tuned, labels, 20, 0)["aqi"].delta
    assert cpu["check_delta_aqi"] == pytest.approx(expected) and expected > 0  # tuned is the better separated
    ex = data["extraction"]
    assert ex["prompts_per_s"] > 0 and ex["n_prompts"] == 6 and ex["mean_prompt_tokens"] == 8
    assert ex["representations_shape"] == [6, 3, 64] and ex["representations_finite"]  # [N, L+1, hidden]
    assert data["aqi_target_met_gpu"] is None  # no GPU here


def test_extraction_batches_from_real_prompts(tokenizer):
    batches = _extraction_batches("embedded", tokenizer, n=5, batch_size=2, prompt_tokens=0, vocab=0, seed=0)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    for b in batches:
        mask = b["attention_mask"]
        assert mask[:, 0].all()  # right padding: every prompt starts at position 0
        assert (b["input_ids"][mask == 0] == tokenizer.pad_token_id).all()
    assert sum(int(b["attention_mask"].sum()) for b in batches) > 5 * 10  # chat-formatted prompts, > 10 tokens each


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n_prompts": 2}, "n_prompts=2"), ({"n_resamples": 0}, "n_resamples=0"), ({"extraction_model": " "}, "empty"),
     ({"extract_quantization": "int8"}, "extract_quantization")],
)
def test_bench_eval_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench_eval(output=tmp_path / "x.json", **kwargs)


def test_profile_summary_on_cuda_reports_kernels_and_host_time():
    """The CUDA branch of the profile summary, fed a stand-in for torch.profiler's key averages (no GPU here)."""
    from types import SimpleNamespace as NS

    from fteval.bench.train_profile import top_ops

    evs = [
        NS(key="void gemm_kernel", count=4, self_device_time_total=4000.0, self_cpu_time_total=0.0, device_type="DeviceType.CUDA"),
        NS(key="kDequantizeBlockwise", count=6, self_device_time_total=1000.0, self_cpu_time_total=0.0,
           device_type="DeviceType.CUDA"),
        NS(key="aten::mm", count=4, self_device_time_total=0.0, self_cpu_time_total=800.0, device_type="DeviceType.CPU"),
        NS(key="cudaLaunchKernel", count=10, self_device_time_total=0.0, self_cpu_time_total=400.0, device_type="DeviceType.CPU"),
    ]
    out = top_ops(NS(key_averages=lambda: evs), 2, torch.device("cuda"))
    assert out["total_ms_per_step"] == pytest.approx(2.5) and out["kernels_per_step"] == 5
    assert [r["name"] for r in out["top"]] == ["void gemm_kernel", "kDequantizeBlockwise"]
    assert out["top"][0]["percent"] == pytest.approx(80.0)
    assert out["categories_ms_per_step"] == {"matmul": pytest.approx(2.0), "4-bit dequantise": pytest.approx(0.5)}
    assert [(r["name"], r["self_cpu_ms_per_step"]) for r in out["host_top"]] == [("aten::mm", 0.4), ("cudaLaunchKernel", 0.2)]


def test_bench_train_fused_loss_and_offload_same_losses(tmp_path, capsys, one_thread):
    out = tmp_path / "train.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora", "grit"], batch_sizes=[2], seq_len=16,
                     gradient_checkpointing=[True], steps=2, warmup=1, quantization="none", output=out,
                     fused_loss=["off", "chunked"], activation_offload=[False, True])
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 3 * 2 * 2 and all(r["error"] is None for r in data["runs"])
    for method in ("plain", "qlora", "grit"):
        rows = [r for r in data["runs"] if r["method"] == method]
        base = next(r for r in rows if r["fused_loss"] == "off" and not r["activation_offload"])
        for r in rows:  # fp32 on CPU: the chunked loss sums the same terms in another order (~1e-7 relative)
            assert r["loss_first"] == pytest.approx(base["loss_first"], rel=1e-5)
            assert r["loss_last"] == pytest.approx(base["loss_last"], rel=1e-4)
    ratios = [c for c in data["comparisons"] if c["fused_loss"] == "chunked"]
    assert ratios and all(c.get("qlora_speed_vs_default") is not None for c in ratios)  # memory: GPU only
    assert "fused loss" in capsys.readouterr().out


def test_bench_train_finds_the_longest_sequence(tmp_path, capsys):
    out = tmp_path / "longest.json"
    rc = bench_train(model_config="tiny", methods=["plain", "qlora"], batch_sizes=[1], seq_len=256,
                     gradient_checkpointing=[True], quantization="none", output=out, find_max_seq_len=True,
                     fused_loss=["chunked"])
    assert rc == 0
    res = json.loads(out.read_text())["results"]
    for r in res:  # nothing runs out of memory at this size: the search reaches the model's positions
        assert r["longest_seq_len"] == 2048 and r["first_failure"] is None
        assert [t["seq_len"] for t in r["tries"]] == [256, 512, 1024, 2048] and all(t["ok"] for t in r["tries"])
    assert "longest sequence" in capsys.readouterr().out
