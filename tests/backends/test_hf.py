"""hf backend on the embedded model: batched left-padded greedy generation, variants, timing records."""

from __future__ import annotations

import pytest
import torch

from fteval.backends import BASELINE, create_backend
from fteval.backends.hf import HFBackend, adapters_disabled
from fteval.data.formatting import format_prompt
from fteval.models.loading import load_causal_lm

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea and the sky at dawn, please.",
    "Name a colour.",
]
NEW = 8  # max_new_tokens for every test: enough to compare outputs, cheap on CPU


@pytest.fixture(scope="module")
def backend():
    return HFBackend("embedded", quantization="none", max_new_tokens=NEW, batch_size=4)


@pytest.fixture(scope="module")
def batch(backend):
    return backend.batch_generate(PROMPTS)


def _random_lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def test_batched_left_padded_equals_one_by_one(backend, batch):
    singles = [backend.generate_response(p) for p in PROMPTS]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert len({r.prompt_tokens for r in batch}) == 3  # different lengths: the batch was padded
    assert "Paris" in batch[0].text


def test_result_fields_and_record(backend, batch):
    tok = backend.tokenizer
    for prompt, r in zip(PROMPTS, batch):
        assert r.prompt_tokens == len(tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"])
        assert 1 <= r.completion_tokens <= NEW
        assert r.finish_reason in ("stop", "length")
        if r.finish_reason == "length":
            assert r.completion_tokens == NEW
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.latency_s)
        assert r.model == BASELINE and r.backend == "hf"
    rec = backend.records[0]
    assert rec.n_prompts == 3 and rec.completion_tokens == sum(r.completion_tokens for r in batch)
    assert rec.tokens_per_s == pytest.approx(rec.completion_tokens / rec.wall_s)
    assert len({r.latency_s for r in batch}) == 1  # one batch: each waited for all of it
    assert 0 < batch[0].latency_s <= rec.wall_s
    assert rec.memory_kind == "process_rss" and rec.memory_bytes > 300 * 2**20  # the fp32 model alone is ~540 MB


def test_raw_prompts(backend):
    raw = HFBackend(backend.model, backend.tokenizer, raw=True, max_new_tokens=4)
    r = raw.generate_response("The capital of France is")
    assert r.prompt_tokens == len(backend.tokenizer("The capital of France is")["input_ids"])
    assert "Paris" in r.text


def test_seeded_sampling_is_reproducible(backend):
    sampler = HFBackend(backend.model, backend.tokenizer, max_new_tokens=NEW, temperature=1.0, seed=3)
    a = sampler.batch_generate(PROMPTS[:2])
    b = sampler.batch_generate(PROMPTS[:2])
    assert [x.text for x in a] == [x.text for x in b]


def test_adapter_variants_from_folder(tmp_path, backend, batch):
    path = tmp_path / "tuned"
    _random_lora(load_causal_lm("embedded").model).save_pretrained(path)
    loaded = load_causal_lm("embedded")
    hf = create_backend("hf", model=loaded.model, tokenizer=loaded.tokenizer, adapters={"tuned": path},
                        max_new_tokens=NEW)
    assert hf.variants == [BASELINE, "tuned"]
    grads = [p.requires_grad for p in hf.model.parameters()]
    base = hf.batch_generate(PROMPTS[:2], BASELINE)
    tuned = hf.batch_generate(PROMPTS[:2], "tuned")
    assert [r.text for r in base] == [r.text for r in batch[:2]]  # adapter off == the plain model
    assert [r.text for r in tuned] != [r.text for r in base]
    assert tuned[0].model == "tuned"
    assert [p.requires_grad for p in hf.model.parameters()] == grads  # set_adapter's side effect undone
    with pytest.raises(ValueError, match=r"variant 'other' is not available.*\['baseline', 'tuned'\]"):
        hf.generate_response("hi", "other")


def test_loaded_peft_model_and_grit_layers(backend, batch):
    from fteval.grit import inject_grit_layers

    peft_model = _random_lora(load_causal_lm("embedded").model)
    hf = HFBackend(peft_model, backend.tokenizer, max_new_tokens=NEW)
    assert hf.variants == [BASELINE, "default"]
    assert hf.generate_response(PROMPTS[0], BASELINE).text == batch[0].text

    grit_model = load_causal_lm("embedded").model
    layers = inject_grit_layers(grit_model, ["q_proj", "v_proj"], r=4, alpha=64)
    torch.manual_seed(0)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.5)
    grit = HFBackend(grit_model, backend.tokenizer, max_new_tokens=NEW)
    assert grit.variants == [BASELINE, "default"]
    assert grit.generate_response(PROMPTS[0], BASELINE).text == batch[0].text
    assert grit.generate_response(PROMPTS[0], "default").text != batch[0].text
    assert all(layer.adapter_enabled for layer in layers.values())  # restored after the baseline call
    with adapters_disabled(grit_model):
        assert not any(layer.adapter_enabled for layer in layers.values())


def test_errors(backend, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        HFBackend(backend.model)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        HFBackend(load_causal_lm("embedded").model, backend.tokenizer, adapters={"x": tmp_path})
    with pytest.raises(ValueError, match="reserved"):
        HFBackend(load_causal_lm("embedded").model, backend.tokenizer, adapters={BASELINE: tmp_path})
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        HFBackend(backend.model, backend.tokenizer, max_new_tokens=0)
    with pytest.raises(ValueError, match="list of prompts"):
        backend.batch_generate("one string")
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):
        create_backend("vllm")
    assert backend.batch_generate([]) == []
