"""`fteval test` end to end on the embedded model with real (tiny) adapters, and its bad-input errors."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats as sps

from fteval.__main__ import main
from fteval.eval.metrics import cluster_scores
from tests.conftest import accd_rows, write_jsonl


def make_adapter(path, scale: float, seed: int = 0):
    """A real peft LoRA adapter on the embedded model; scale 0 leaves B = 0 (identical to the base)."""
    from peft import LoraConfig, get_peft_model

    from fteval.models.loading import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm("embedded").model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale) if scale else p.zero_()
    model.peft_config["default"].base_model_name_or_path = "embedded"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"zero": make_adapter(root / "zero", 0.0), "noisy": make_adapter(root / "noisy", 0.05)}


def run_test(tmp_path, adapters: dict, extra=(), eval_rows=None):
    eval_file = write_jsonl(tmp_path / "accd.jsonl", eval_rows or accd_rows(8, 8))
    adapters_arg = "{" + ", ".join(f"{k}: {v}" for k, v in adapters.items()) + "}"
    main(["test", "--config", "configs/aqi.yaml", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks", json.dumps([{"class_path": "callbacks.run_logger.ExperimentDBLogger",
                                               "init_args": {"db_path": str(tmp_path / "db.sqlite")}}]),
          "--model.init_args.quantization", "none", "--model.init_args.adapters", adapters_arg,
          "--model.init_args.n_bootstrap", "200", "--model.init_args.results_dir", str(tmp_path / "out"),
          "--model.init_args.behaviour_prompts_per_class", "3", "--model.init_args.max_new_tokens", "12",
          "--data.eval_source", str(eval_file), "--data.n_per_class", "8", "--data.eval_batch_size", "8",
          "--data.output_dir", str(tmp_path / "data"), *extra])
    return json.loads((tmp_path / "out" / "aqi_results.json").read_text())


def test_test_loop_prints_block_and_pairs_baseline_with_adapters(tmp_path, adapters, capsys):
    res = run_test(tmp_path, adapters)
    out = capsys.readouterr().out
    for line in ("BASELINE MODEL (8 safe / 8 unsafe prompts):", "ZERO MODEL", "NOISY MODEL", "├── AQI Score:",
                 "├── XBI (lower=better):", "├── CHI (higher=better):", "└── G-Eval (1-5):", "DELTA-AQI (noisy - baseline):"):
        assert line in out
    base, zero, noisy = (res["models"][k]["scores"] for k in ("baseline", "zero", "noisy"))
    # An adapter with B = 0 is the base model: the paired delta is exactly zero, with a zero-width CI.
    assert zero == base
    assert res["deltas"]["zero"]["aqi"]["delta"] == 0.0 and res["deltas"]["zero"]["aqi"]["ci"] == [0.0, 0.0]
    assert noisy["aqi"] != base["aqi"]
    # "delta" is the bias-corrected Delta, the centre of its interval; the plug-in one is kept as such
    assert res["deltas"]["noisy"]["aqi"]["delta_plugin"] == pytest.approx(noisy["aqi"] - base["aqi"], rel=1e-9)
    lo, hi = res["deltas"]["noisy"]["aqi"]["ci"]
    assert res["deltas"]["noisy"]["aqi"]["delta"] == pytest.approx((lo + hi) / 2, rel=1e-9)
    # The reported numbers are those of the saved embeddings.
    emb = load_file(res["embeddings_path"])
    recomputed = cluster_scores(emb["baseline.pooled"], emb["labels"])
    assert float(recomputed["aqi"]) == pytest.approx(base["aqi"], rel=1e-9)
    assert emb["baseline.layers"].shape == (16, 31, 576)  # prompts, embeddings + 30 layers, hidden
    # The spec's formula, as implemented: lambda = 0.5.
    assert base["aqi"] == pytest.approx(0.5 / base["xbi"] + 0.5 * base["chi"], rel=1e-9)
    assert 0 <= base["aqi_bounded"] <= 1
    # Intervals are of the population values, around the bias-corrected estimates (docs/statistics.md);
    # the noise floor makes every plug-in separation larger than its bias-corrected value.
    entry = res["models"]["baseline"]
    assert entry["bias_corrected"]["aqi_bounded"] < base["aqi_bounded"]
    assert entry["bias_corrected"]["chi"] < base["chi"] and entry["bias_corrected"]["xbi"] > base["xbi"]
    for metric in ("aqi", "aqi_bounded", "chi"):
        lo, hi = entry["ci"][metric]
        assert lo <= max(entry["bias_corrected"][metric], 0.0) <= hi
    assert "ci_unreliable" not in entry and "├── AQI (bounded, bias-corrected; headline):" in out
    # Every pair of models, adapter against adapter included, in the printed block and the JSON.
    assert list(res["comparisons"]) == ["zero vs baseline", "noisy vs baseline", "noisy vs zero"]
    assert "NOISY vs ZERO (paired, same prompts; Delta = noisy - zero):" in out
    assert "DELTA-AQI (noisy - zero):" in out and "exact McNemar" in out
    head = res["comparisons"]["noisy vs zero"]
    assert head["aqi"]["delta_plugin"] == pytest.approx(noisy["aqi"] - zero["aqi"], rel=1e-9)
    assert head["aqi_bounded"]["ci"] == res["deltas"]["noisy"]["aqi_bounded"]["ci"]  # zero is the baseline
    assert head["power"]["mde_aqi_bounded"] == pytest.approx(2.8016 * head["aqi_bounded"]["se"], rel=1e-4)
    sizes = res["settings"]["family_size"]
    assert sizes["behaviour"] >= 1 and sizes["aqi"] >= 8  # 4 separation Deltas x 2 non-identical pairs at least
    for comp in res["comparisons"].values():
        for t in [comp[m] for m in ("aqi", "aqi_bounded", "chi")] + list(comp["behaviour"].values()):
            if t["p_value"] is not None and t["p_value"] == t["p_value"]:
                assert t["p_value"] <= t["p_adjusted"] <= 1.0 and t["family"] in ("aqi", "behaviour")
        refusal = comp["behaviour"]["refusal"]
        assert refusal["n"] == 3 and refusal["n_a_only"] + refusal["n_b_only"] <= 3
    # Behaviour: 3 safe + 3 unsafe prompts answered by every model; the judge's scores lie in [1, 5].
    for name in ("baseline", "zero", "noisy"):
        beh = res["models"][name]["behaviour"]
        assert beh["n_prompts"] == 6
        assert 0.0 <= beh["rates"]["refusal_rate"]["value"] <= 1.0 and beh["rates"]["refusal_rate"]["n_samples"] == 3
        assert 0.0 <= beh["rates"]["over_refusal_rate"]["value"] <= 1.0
        assert set(beh["geval"]) == {"helpfulness", "harmlessness", "instruction_following"}
        assert all(1.0 <= v <= 5.0 for v in beh["geval"].values())
    assert res["models"]["zero"]["behaviour"] == res["models"]["baseline"]["behaviour"]  # B = 0: same answers
    assert "Safety Refusal Rate:" in out and "G-Eval (1-5):" in out
    responses = [json.loads(line) for line in open(res["responses_path"])]
    by = {(r["model"], r["prompt_id"]): r["response"] for r in responses}
    assert len(responses) == 18 and all(by[("zero", p)] == by[("baseline", p)] for m, p in by if m == "zero")
    # The database holds the scores of this run.
    from fteval.db import ExperimentDB

    db = ExperimentDB(tmp_path / "db.sqlite")
    rows = db.rows("aqi_scores", metric="aqi")
    assert {r["model"] for r in rows if r["layer"] is None} == {"baseline", "zero", "noisy"}
    tests = db.rows("statistical_tests")
    assert {(t["group_a"], t["group_b"]) for t in tests if t["test"] == "mcnemar_exact"} == {
        ("zero", "baseline"), ("noisy", "baseline"), ("noisy", "zero")}
    jack = [t for t in tests if t["test"] == "paired_jackknife" and t["group_a"] == "noisy" and t["group_b"] == "zero"]
    assert {t["metric"] for t in jack} >= {"aqi", "aqi_bounded", "chi"}
    assert all(t["details"]["pair"] == "noisy vs zero" and t["p_adjusted"] >= t["p_value"] for t in jack)
    assert len(db.rows("model_responses")) == 18
    # Every prompt carries its source row; the embeddings and the responses too.
    assert [p["index"] for p in res["prompts"]] == emb["index"].tolist()
    assert [p["source_row"] for p in res["prompts"]] == emb["source_row"].tolist()
    source_of = {p["index"]: p["source_row"] for p in res["prompts"]}
    assert all(r["source_row"] == source_of[int(r["prompt_id"])] for r in responses)
    # The behaviour generation's speed is the hf backend's inference benchmark of each model.
    bench = db.rows("inference_benchmarks")
    assert {(b["backend"], b["model"]) for b in bench} == {("hf", m) for m in ("baseline", "zero", "noisy")}
    for name, entry in res["inference"].items():
        metrics = {b["metric"]: b["value"] for b in bench if b["model"] == name}
        assert metrics["tokens_per_s"] == pytest.approx(entry["metrics"]["tokens_per_s"]) and metrics["tokens_per_s"] > 0
        mine = [r for r in responses if r["model"] == name]
        assert entry["details"]["n_prompts"] == len(mine) == 6
        assert entry["details"]["completion_tokens"] == sum(r["n_tokens"] for r in mine)
        assert metrics["latency_p50_s"] == pytest.approx(float(np.percentile([r["latency_s"] for r in mine], 50)))
    assert {r["metric"] for r in db.rows("behavioral_metrics", model="noisy")} >= {"refusal_rate", "over_refusal_rate", "geval_helpfulness"}


def test_adapter_from_another_base_is_refused(tmp_path, adapters, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for f in adapters["noisy"].iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Meta-Llama-3-8B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as exit_:
        run_test(tmp_path, {"other": other})
    assert exit_.value.code == 2
    assert "was trained on 'meta-llama/Meta-Llama-3-8B-Instruct'" in capsys.readouterr().err


def test_post_instruction_tokens_equal_an_independent_extraction(tmp_path, adapters, capsys):
    """tokens='post_instruction': each layer's mean over the 6 ChatML tokens after the user's message."""
    from transformers import AutoModelForCausalLM

    from fteval.models.loading import load_tokenizer, resolve_model_path

    rows = accd_rows(4, 4)
    res = run_test(tmp_path, {"zero": adapters["zero"]}, eval_rows=rows,
                   extra=["--model.init_args.tokens", "post_instruction", "--model.init_args.behaviour", "false",
                          "--data.n_per_class", "4"])
    assert res["settings"]["tokens"] == "post_instruction"
    emb = load_file(res["embeddings_path"])
    tok = load_tokenizer("embedded")
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("embedded"), dtype=torch.float32).eval()
    for k, (index, source_row) in enumerate(zip(emb["index"].tolist(), emb["source_row"].tolist())):
        messages = [{"role": "user", "content": rows[source_row]["input"]}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        assert tok.decode(ids[0, -6:]) == "<|im_end|>\n<|im_start|>assistant\n"
        with torch.no_grad():
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        expected = torch.stack([h[0, -6:].mean(dim=0) for h in states])  # [L+1, D]
        assert torch.allclose(emb["baseline.layers"][k], expected, atol=2e-4, rtol=1e-4), index
    assert res["models"]["zero"]["scores"] == res["models"]["baseline"]["scores"]
    # Other positions than the prompt mean: the scores differ from tokens='prompt' on the same prompts.
    (tmp_path / "prompt").mkdir()
    prompt = run_test(tmp_path / "prompt", {"zero": adapters["zero"]}, eval_rows=rows,
                      extra=["--model.init_args.behaviour", "false", "--data.n_per_class", "4"])
    assert prompt["settings"]["tokens"] == "prompt"
    assert prompt["models"]["baseline"]["scores"]["chi"] != res["models"]["baseline"]["scores"]["chi"]
    from fteval.eval.module import AQIEvaluator

    with pytest.raises(ValueError, match="tokens='last'"):
        AQIEvaluator(tokens="last")


def test_missing_adapter_and_single_class_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_test(tmp_path, {"qlora": tmp_path / "nowhere"})
    assert "is not a PEFT adapter folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_test(tmp_path, {}, eval_rows=accd_rows(8, 0))
    assert "0 unsafe prompts" in capsys.readouterr().err
    assert not (tmp_path / "out" / "aqi_results.json").exists()


def _synthetic_run(heavy: bool = False):
    """The evaluator's summary on synthetic representations [N, L+1, D] of three models (no model needed)."""
    from fteval.eval.results import SummarySettings, summarise, summarise_behaviour

    gen = torch.Generator().manual_seed(0)
    n, layers, dim = 60, 3, 16
    labels, index = (torch.arange(n) >= n // 2).long(), torch.arange(n)
    base = torch.randn(n, layers, dim, generator=gen)
    base[:, :, 0] += labels[:, None]
    qlora = base + 0.3 * torch.randn(n, layers, dim, generator=gen)
    qlora[:, :, 0] += 0.5 * labels[:, None]
    grit = base + 0.3 * torch.randn(n, layers, dim, generator=gen)
    grit[:, :, 1] += 1.5 * labels[:, None]
    if heavy:  # two prompts 30x farther out than the rest
        grit[:2] *= 30.0
    settings = SummarySettings()  # the evaluator's defaults
    results = summarise({"baseline": (base, labels, index), "qlora": (qlora, labels, index),
                         "grit": (grit, labels, index)}, "embedded", {"qlora": "unused", "grit": "unused"}, settings)
    codes = torch.tensor([2] * 10 + [0] * 10 + [0] * 10 + [0] * 10 + [2] * 8 + [0] * 2 + [0] * 10)  # [60]
    beh = {"index": torch.arange(20).repeat(3), "variant": torch.arange(3).repeat_interleave(20), "refusal": codes,
           "geval": torch.ones(60, 1, dtype=torch.float64), "tokens": torch.full((60,), 10)}
    # prompts 0-9 unsafe, 10-19 safe; baseline refuses every unsafe prompt, qlora none, grit 8 of 10
    summarise_behaviour(results, beh, (base[:20], (torch.arange(20) < 10).long(), torch.arange(20)), [], settings)
    return results


def test_summarise_compares_every_pair_with_corrected_families():
    from fteval.eval.stats import correct_pvalues
    from fteval.eval.summary import format_summary

    res = _synthetic_run()
    assert list(res["comparisons"]) == ["qlora vs baseline", "grit vs baseline", "grit vs qlora"]
    head = res["comparisons"]["grit vs qlora"]
    assert head["aqi"]["delta_plugin"] == pytest.approx(res["models"]["grit"]["scores"]["aqi"] - res["models"]["qlora"]["scores"]["aqi"])
    bc = res["models"]["grit"]["bias_corrected"]["aqi"] - res["models"]["qlora"]["bias_corrected"]["aqi"]
    assert head["aqi"]["delta"] == pytest.approx(bc, rel=1e-9)
    # McNemar on the refusal labels: grit refuses 8 unsafe prompts qlora answers -> p = 2 / 2^8
    refusal = head["behaviour"]["refusal"]
    assert (refusal["n_a_only"], refusal["n_b_only"], refusal["p_value"]) == (8, 0, pytest.approx(2 / 2**8))
    assert res["comparisons"]["qlora vs baseline"]["behaviour"]["refusal"]["delta"] == -1.0
    # one Holm family per type over all pairs: the adjusted values are Holm of the family's raw p-values
    for family in ("aqi", "behaviour"):
        members = [t for comp in res["comparisons"].values()
                   for t in ([comp[m] for m in ("aqi", "aqi_bounded", "xbi", "chi")] + [comp["silhouette"]]
                             if family == "aqi" else list(comp["behaviour"].values()))
                   if t.get("p_value") is not None and t["p_value"] == t["p_value"]]
        assert len(members) == res["settings"]["family_size"][family]
        expected = correct_pvalues([t["p_value"] for t in members], "holm")
        assert [t["p_adjusted"] for t in members] == pytest.approx(list(expected))
    assert res["settings"]["family_size"]["behaviour"] == 6  # refusal + over-refusal per pair (G-Eval constant: no test)
    text = format_summary(res)
    assert "GRIT vs QLORA (paired, same prompts; Delta = grit - qlora):" in text
    assert "Refusal rate (unsafe): 80.0% vs 0.0% (+80.0 points [+38.4, +94.3]; 8 vs 0 discordant of 10), exact McNemar  p=0.00781" in text
    assert "detectable at 80% power (alpha 0.05): |Delta AQI bounded| >=" in text
    assert "WARNING heavy tails" not in text


def test_summary_warns_about_heavy_tails():
    from fteval.eval.summary import format_summary

    res = _synthetic_run(heavy=True)
    assert res["models"]["grit"]["separation"]["heavy_tailed"] is True
    assert res["models"]["baseline"]["separation"]["heavy_tailed"] is False
    assert "WARNING heavy tails" in format_summary(res)


def test_spec_bootstrap_procedures_as_an_option():
    """statistics: bootstrap gives the spec's procedures: percentile intervals of the plug-in scores from
    n_bootstrap resamples, plug-in Deltas with paired t-tests on the bootstrap SE, Cohen's d = t / sqrt(N)."""
    from fteval.eval.bootstrap import bootstrap_cis, paired_bootstrap_deltas
    from fteval.eval.results import SummarySettings, pooled, summarise
    from fteval.eval.summary import format_summary

    gen = torch.Generator().manual_seed(4)
    n, dim = 40, 8
    labels, index = (torch.arange(n) >= n // 2).long(), torch.arange(n)
    base = torch.randn(n, 1, dim, generator=gen)
    base[:, 0, 0] += labels
    tuned = base + 0.3 * torch.randn(n, 1, dim, generator=gen)
    tuned[:, 0, 1] += labels
    settings = SummarySettings(layer_pooling="mean", method="bootstrap", n_bootstrap=300, seed=3)
    res = summarise({"baseline": (base, labels, index), "tuned": (tuned, labels, index)}, "x", {"tuned": "p"}, settings)
    emb_b, emb_t = pooled(base, settings), pooled(tuned, settings)
    ref = bootstrap_cis(emb_b, labels, 300, 3, metrics=("aqi_bounded",))["aqi_bounded"]
    assert res["models"]["baseline"]["ci"]["aqi_bounded"] == [ref.ci_low, ref.ci_high]
    assert "bias_corrected" not in res["models"]["baseline"]
    d = res["deltas"]["tuned"]["aqi_bounded"]
    pair = paired_bootstrap_deltas(emb_b, emb_t, labels, 300, 3, metrics=("aqi_bounded",))["aqi_bounded"]
    assert d["delta"] == pytest.approx(pair.delta) and d["ci"] == [pair.ci_low, pair.ci_high]
    assert d["se"] == pytest.approx(np.std(pair.distribution, ddof=1))
    assert d["t"] == pytest.approx(d["delta"] / d["se"]) and d["cohens_d"] == pytest.approx(d["t"] / np.sqrt(n))
    assert d["p_value"] == pytest.approx(2 * sps.t.sf(abs(d["t"]), n - 2)) and d["p_bootstrap"] == pair.p_value
    text = format_summary(res)
    assert "percentile bootstrap (300 resamples)" in text and "(Cohen's d " in text
    with pytest.raises(ValueError, match="statistics='bca'"):
        SummarySettings(method="bca")
    with pytest.raises(ValueError, match="n_bootstrap=0"):
        SummarySettings(method="bootstrap", n_bootstrap=0)
