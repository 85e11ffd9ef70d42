"""`fteval test` with its behaviour answers from llama.cpp (base GGUF + exported LoRA GGUFs); option errors."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fteval.__main__ import main
from fteval.backends.base import BASELINE
from fteval.eval.serving import behaviour_backend
from tests.eval.test_module import make_adapter, run_test

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed; install it with `pip install 'fteval[llamacpp]'`",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    adapters = {"zero": make_adapter(root / "zero", 0.0), "noisy": make_adapter(root / "noisy", 0.05)}
    for path in adapters.values():
        main(["export", str(path)])
    return adapters


@needs_llama
def test_behaviour_through_llamacpp_is_recorded_per_backend(tmp_path, exported, capsys):
    res = run_test(tmp_path, exported, extra=["--model.init_args.behaviour_backend", "llamacpp",
                                              "--model.init_args.behaviour_backend_options", "{n_threads: 1, n_ctx: 512}"])
    out = capsys.readouterr().out
    assert "answers by llamacpp (SmolLM2-135M-Instruct.Q4_1.gguf + adapter-f16.gguf)" in out
    assert "answers by llamacpp (SmolLM2-135M-Instruct.Q4_1.gguf)," in out
    assert "Safety Refusal Rate:" in out and "G-Eval (1-5):" in out
    responses = [json.loads(line) for line in open(res["responses_path"])]
    assert len(responses) == 18 and {r["backend"] for r in responses} == {"llamacpp"}
    assert all(r["latency_s"] > 0 and 1 <= r["n_tokens"] <= 12 for r in responses)
    by = {(r["model"], r["prompt_id"]): r["response"] for r in responses}
    # a zero LoRA on llama.cpp answers exactly as the base GGUF; the noisy one does not
    assert all(by[("zero", p)] == by[(BASELINE, p)] for m, p in by if m == "zero")
    assert any(by[("noisy", p)] != by[(BASELINE, p)] for m, p in by if m == "noisy")
    for name in (BASELINE, "zero", "noisy"):
        gen = res["models"][name]["generation"]
        assert gen["backend"] == "llamacpp" and gen["tokens_per_s"] > 0
        assert res["inference"][name]["details"]["backend"] == "llamacpp"
    assert res["models"]["noisy"]["generation"]["served"] == "SmolLM2-135M-Instruct.Q4_1.gguf + adapter-f16.gguf"
    from fteval.db import ExperimentDB

    bench = ExperimentDB(tmp_path / "db.sqlite").rows("inference_benchmarks")
    assert {(b["backend"], b["model"]) for b in bench} == {("llamacpp", m) for m in (BASELINE, "zero", "noisy")}


def _make(kind, options, adapters=None, name="embedded"):
    return behaviour_backend(kind, options, model=None, tokenizer=None, model_name_or_path=name,
                             adapters=adapters or {}, batch_size=4, max_new_tokens=8, template="auto", system_prompt=None)


@needs_llama
def test_llamacpp_options_are_checked(tmp_path, exported):
    with pytest.raises(FileNotFoundError, match=r"adapter 'raw' has no llama.cpp LoRA GGUF at .*adapter-f16.gguf; "
                                                 r"export it with `python -m fteval export"):
        _make("llamacpp", {}, {"raw": str(tmp_path)})
    with pytest.raises(ValueError, match=r"names \['other'\], which are not among the evaluated adapters \['noisy'\]"):
        _make("llamacpp", {"adapters": {"other": "x.gguf"}}, {"noisy": str(exported["noisy"])})
    with pytest.raises(ValueError, match=r"needs the base model 'meta-llama/x' as GGUF"):
        _make("llamacpp", {}, name="meta-llama/x")
    with pytest.raises(ValueError, match=r"\['batch_size'\] are not options of the llamacpp backend"):
        _make("llamacpp", {"batch_size": 2})
    backend = _make("llamacpp", {"n_threads": 1}, {"noisy": str(exported["noisy"])})
    assert backend.variants == [BASELINE, "noisy"] and backend.loras["noisy"].name == "adapter-f16.gguf"
    backend.close()


def test_openai_and_hf_options_are_checked():
    with pytest.raises(ValueError, match="needs the server: set model.init_args.behaviour_backend_options"):
        _make("openai", {})
    with pytest.raises(ValueError, match=r"one served model name per variant; behaviour_backend_options.models lacks "
                                         r"\['qlora'\]"):
        _make("openai", {"base_url": "http://127.0.0.1:9/v1", "models": {"baseline": "b"}}, {"qlora": "q"})
    with pytest.raises(ValueError, match=r"names \['grit'\], which are not evaluated variants"):
        _make("openai", {"base_url": "http://127.0.0.1:9/v1", "models": {"baseline": "b", "grit": "g"}})
    backend = _make("openai", {"base_url": "http://127.0.0.1:9/v1", "models": {"baseline": "b", "qlora": "q"}},
                    {"qlora": "q"})
    assert backend.variants == [BASELINE, "qlora"] and backend.describe("qlora") == "q at http://127.0.0.1:9/v1"
    with pytest.raises(ValueError, match=r"\['gguf'\] are not options of the hf backend; use \['batch_size', "
                                         r"'cache_implementation'\]"):
        _make("hf", {"gguf": "x"})
    with pytest.raises(ValueError, match=r"cache_implementation='paged' is not one of 'dynamic', 'static'"):
        _make("hf", {"cache_implementation": "paged"})


def test_hf_options_set_the_batch_and_the_cache(tokenizer):
    from transformers import LlamaForCausalLM

    from fteval.bench.common import llama_config

    config = llama_config("tiny")
    config.vocab_size = len(tokenizer)
    model = LlamaForCausalLM(config)
    backend = behaviour_backend("hf", {"batch_size": 16, "cache_implementation": "static"}, model=model,
                                tokenizer=tokenizer, model_name_or_path="embedded", adapters={}, batch_size=4,
                                max_new_tokens=8, template="auto", system_prompt=None)
    assert backend.batch_size == 16 and backend._generation_config().cache_implementation == "static"
    default = behaviour_backend("hf", None, model=model, tokenizer=tokenizer, model_name_or_path="embedded",
                                adapters={}, batch_size=4, max_new_tokens=8, template="auto", system_prompt=None)
    assert default.batch_size == 4 and default._generation_config().cache_implementation is None


def test_a_missing_lora_gguf_is_one_line_exit_2(tmp_path, capsys):
    adapter = make_adapter(tmp_path / "plain", 0.0)
    with pytest.raises(SystemExit) as exit_:
        run_test(tmp_path, {"plain": adapter}, extra=["--model.init_args.behaviour_backend", "llamacpp"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "fteval: error:" in line]
    assert exit_.value.code == 2 and len(errors) == 1
    assert "has no llama.cpp LoRA GGUF" in errors[0] and "python -m fteval export" in errors[0]
    assert not (tmp_path / "out").exists()
