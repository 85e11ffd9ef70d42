"""bench_generation: table, JSON report, skipped backends, database rows."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from fteval.bench.generation import bench_generation, bench_prompts

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def test_bench_all_backends(tmp_path, capsys):
    out = tmp_path / "bench.json"
    db = tmp_path / "exp.db"
    rc = bench_generation(backends=["hf", "llamacpp", "openai"], n_prompts=3, max_new_tokens=4, output=out,
                          n_threads=1, db=db)
    assert rc == 0
    report = json.loads(out.read_text())
    ran = ["hf", "llamacpp"] if HAVE_LLAMA else ["hf"]
    assert sorted(report["results"]) == ran and report["variants"] == ["baseline"]
    assert "base_url" in report["skipped"]["openai"]
    for name in ran:
        r = report["results"][name]["baseline"]
        assert r["n_prompts"] == 3 and 3 <= r["completion_tokens"] <= 12
        assert r["tokens_per_s"] == pytest.approx(r["completion_tokens"] / r["wall_s"])
        assert r["requests_per_s"] == pytest.approx(3 / r["wall_s"])
        assert 0 < r["latency_p50_s"] <= r["latency_p95_s"]
        assert r["memory_kind"] == "process_rss" and r["memory_gib"] > 0.05
    assert report["results"]["hf"]["baseline"]["clients"] == 8
    if HAVE_LLAMA:
        agree = report["results"]["llamacpp"]["baseline"]["agreement_with_hf"]
        assert 0 <= agree["exact"] <= agree["prefix"] <= 1
    assert report["machine"]["hardware"]["cpu_count"] >= 1
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "openai    skipped" in printed

    from fteval.db import ExperimentDB

    with ExperimentDB(db) as store:
        rows = store.rows("inference_benchmarks")
    assert {r["backend"] for r in rows} == set(ran)
    tps = [r for r in rows if r["backend"] == "hf" and r["metric"] == "tokens_per_s"]
    assert len(tps) == 1 and tps[0]["value"] == pytest.approx(report["results"]["hf"]["baseline"]["tokens_per_s"])
    assert tps[0]["unit"] == "tokens/s" and tps[0]["model"] == "baseline"


def test_first_tokens_agreement(tokenizer):
    from fteval.bench.generation import first_tokens_agreement

    same = "The capital of France is Paris."
    got = first_tokens_agreement([same, same, "a b c d"], [same, "The capital of Spain is Madrid.", "a b x y"], tokenizer)
    n = len(tokenizer(same, add_special_tokens=False)["input_ids"])
    assert got["exact"] == pytest.approx(1 / 3)
    assert got["prefix"] == pytest.approx((1 + 3 / n + 2 / 4) / 3)  # "The capital of" agree; "a b" agree


def test_missing_package_is_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    rc = bench_generation(backends=["llamacpp", "openai"], n_prompts=1, max_new_tokens=2, output=tmp_path / "b.json")
    assert rc == 1  # nothing could run
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["results"] == {}
    assert "pip install 'fteval[llamacpp]'" in report["skipped"]["llamacpp"]
    assert "no backend could run" in capsys.readouterr().out


def test_bad_arguments(tmp_path):
    assert len(bench_prompts(4)) == 4
    with pytest.raises(ValueError, match="n_prompts=100000 must lie between 1 and"):
        bench_generation(backends=["hf"], n_prompts=100000, output=tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"\['vllm'\] must be a non-empty list"):
        bench_generation(backends=["vllm"], output=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_bench_every_variant_on_every_backend(tmp_path):
    from fteval.__main__ import main
    from tests.eval.test_module import make_adapter

    noisy = make_adapter(tmp_path / "noisy", 0.05)
    plain = make_adapter(tmp_path / "plain", 0.05, seed=1)  # not exported: llama.cpp has no file for it
    main(["export", str(noisy)])
    out = tmp_path / "bench.json"
    rc = bench_generation(backends=["hf", "llamacpp"], n_prompts=2, max_new_tokens=4, output=out, n_threads=1,
                          adapters={"noisy": str(noisy), "plain": str(plain)})
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["variants"] == ["baseline", "noisy", "plain"]
    assert sorted(report["results"]["hf"]) == ["baseline", "noisy", "plain"]
    if HAVE_LLAMA:
        llama = report["results"]["llamacpp"]
        assert sorted(llama) == ["baseline", "noisy"]
        assert llama["noisy"]["served"] == "SmolLM2-135M-Instruct.Q4_1.gguf + adapter-f16.gguf"
        assert llama["noisy"]["load_s"] >= llama["noisy"]["variant_load_s"] > 0
        assert "python -m fteval export" in report["skipped"]["llamacpp/plain"]
        for variant in ("baseline", "noisy"):
            agree = llama[variant]["agreement_with_hf"]
            assert 0 <= agree["exact"] <= agree["prefix"] <= 1
    assert all(len(r["responses"]) == 2 and r["clients"] == 8 for r in report["results"]["hf"].values())


def test_bench_refuses_bad_adapters(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter 'x': .* is not a PEFT adapter folder"):
        bench_generation(backends=["hf"], adapters={"x": str(tmp_path)}, output=tmp_path / "x.json")
    with pytest.raises(ValueError, match="adapter name 'baseline' is reserved"):
        bench_generation(backends=["hf"], adapters={"baseline": str(tmp_path)}, output=tmp_path / "x.json")
    with pytest.raises(ValueError, match="concurrency=0 must be >= 1"):
        bench_generation(backends=["hf"], concurrency=0, output=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
