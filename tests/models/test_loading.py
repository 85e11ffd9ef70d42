import pytest
import torch

from fteval.models.loading import (
    ModelLoadError,
    embedded_gguf_path,
    load_causal_lm,
    materialise_embedded,
    resolve_model_path,
    select_attn_implementation,
)


@pytest.mark.slow
def test_embedded_from_gguf_and_from_cache_give_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    folder = materialise_embedded(tmp_path)  # fresh cache: converts the GGUF once
    assert (folder / "model.safetensors").is_file()
    assert materialise_embedded(tmp_path) == folder  # second call reuses the folder
    cached = load_causal_lm("embedded", cache_dir=tmp_path).model.eval()
    ids = torch.tensor([[1, 504, 3458, 314, 260, 3767, 30]])
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)


def test_embedded_model_is_a_llama_instruct_model():
    loaded = load_causal_lm("embedded")
    assert loaded.model.config.model_type == "llama"
    assert loaded.model.config.num_hidden_layers == 30
    assert loaded.attn_implementation == "sdpa"  # no GPU / flash_attn here
    assert loaded.tokenizer.pad_token is not None


@pytest.mark.parametrize(
    "name, message",
    [("", "model name is empty"), ("./no/such/folder", "does not exist"), ("/tmp", "has no config.json")],
)
def test_bad_model_names(name, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_path(name)


def test_unknown_hub_id_offline_gives_clear_error():
    with pytest.raises(ModelLoadError, match="could not load model 'nobody/no-such-model'.*Fix:"):
        load_causal_lm("nobody/no-such-model", local_files_only=True)


def test_attention_selection():
    assert select_attn_implementation("auto") == "sdpa"
    assert select_attn_implementation("eager") == "eager"
    with pytest.raises(ModelLoadError, match="flash_attn is not installed"):
        select_attn_implementation("flash_attention_2")
    with pytest.raises(ModelLoadError, match="quantization='int3'"):
        load_causal_lm("embedded", quantization="int3")
