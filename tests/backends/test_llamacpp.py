"""llamacpp backend on the embedded GGUF (needs llama-cpp-python: `pip install 'fteval[llamacpp]'`)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from fteval.backends import BASELINE, BackendUnavailableError
from fteval.data.formatting import format_prompt
from fteval.models.loading import embedded_gguf_path

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed; install it with `pip install 'fteval[llamacpp]'`",
)
NEW = 8


@pytest.fixture(scope="module")
def backend():
    from fteval.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend("embedded", max_new_tokens=NEW, n_threads=1, n_ctx=512,
                        variants={"copy": embedded_gguf_path()})
    yield b
    b.close()


@needs_llama
def test_chat_generation(backend, tokenizer):
    results = backend.batch_generate(["What is the capital of France?", "Name a colour."])
    assert all(r.text.strip() for r in results)
    for prompt, r in zip(["What is the capital of France?", "Name a colour."], results):
        # llama.cpp applies the chat template stored in the GGUF: the same prompt as transformers'
        assert r.prompt_tokens == len(tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"])
        assert 1 <= r.completion_tokens <= NEW
        assert r.tokens_per_s == pytest.approx(r.completion_tokens / r.latency_s)
        assert r.backend == "llamacpp" and r.finish_reason in ("stop", "length")
    rec = backend.records[-1]
    # prompts run one after another: each latency is its own, and they add up to the call
    assert sum(r.latency_s for r in results) <= rec.wall_s
    assert rec.memory_kind == "process_rss" and rec.memory_bytes > 50 * 2**20


@needs_llama
def test_greedy_is_deterministic_and_variants(backend):
    a = backend.generate_response("Write a haiku about tea.")
    b = backend.generate_response("Write a haiku about tea.")
    c = backend.generate_response("Write a haiku about tea.", "copy")  # same file under another name
    assert a.text == b.text == c.text and c.model == "copy"
    assert backend.variants == [BASELINE, "copy"]
    with pytest.raises(ValueError, match=r"variant 'tuned' is not available.*\['baseline', 'copy'\]"):
        backend.generate_response("hi", "tuned")


@needs_llama
def test_raw_completion():
    from fteval.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend("embedded", raw=True, max_new_tokens=4, n_threads=1, n_ctx=256) as raw:
        r = raw.generate_response("The capital of France is")
    assert "Paris" in r.text and r.prompt_tokens == 5


@needs_llama
def test_bad_files(tmp_path):
    from fteval.backends.llamacpp import LlamaCppBackend

    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        LlamaCppBackend(tmp_path / "missing.gguf")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        LlamaCppBackend(tmp_path / "model.bin")


def test_missing_package_names_the_extra(monkeypatch):
    from fteval.backends.llamacpp import LlamaCppBackend

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import now raises ImportError
    with pytest.raises(BackendUnavailableError, match=r"pip install 'fteval\[llamacpp\]'"):
        LlamaCppBackend("embedded")
    with pytest.raises(ImportError):  # also catchable as an ImportError
        LlamaCppBackend("embedded")
