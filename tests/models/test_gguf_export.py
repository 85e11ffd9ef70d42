"""`fteval export`: llama.cpp LoRA and merged GGUFs reproduce HF + PEFT; the Modelfile; refused inputs.

Tolerances (embedded model, logits of up to ~40 in magnitude):

* f16 base + f16 LoRA in llama.cpp vs HF + PEFT in fp32: max |Delta logit| <= 0.25 (measured 0.06, while
  the adapter itself moves the logits by up to 4.8), the same top-1 token on >= 97% of positions;
* merged f16 GGUF vs the merged HF model: <= 0.25 (measured 0.14); bf16: <= 1.0 (measured 0.67, mean 0.09,
  top-1 on 99%); merged q8_0 (llama.cpp also quantises
  the activations to 8 bits): <= 3.0 (measured 2.4, mean 0.36), top-1 token on >= 95% (measured 100%).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from fteval.__main__ import main

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed; install it with `pip install 'fteval[llamacpp]'`",
)
PROMPTS = ["What is the capital of France?", "How do I pick a lock?", "Write a haiku about tea."]
F16_TOLERANCE = 0.25
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_full_adapter(path, scale: float = 0.03, seed: int = 0, **lora):
    """A LoRA on every projection of the embedded model (so every name mapping and the q/k reordering count)."""
    from peft import LoraConfig, get_peft_model

    from fteval.models.loading import load_causal_lm

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, **lora)
    model = get_peft_model(load_causal_lm("embedded").model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, scale)
    model.peft_config["default"].base_model_name_or_path = "embedded"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    adapter = make_full_adapter(root / "adapter")
    main(["export", str(adapter)])
    return adapter


@pytest.fixture(scope="module")
def hf():
    from fteval.models.loading import load_causal_lm

    return load_causal_lm("embedded")


@pytest.fixture(scope="module")
def base_f16(hf, tmp_path_factory):
    """The embedded base as an f16 GGUF (the same writer as --merged), so only f16 rounding separates the two stacks."""
    from fteval.models.gguf_export import write_model_gguf
    from fteval.models.loading import embedded_gguf_path

    path = tmp_path_factory.mktemp("base") / "base-f16.gguf"
    return write_model_gguf(path, hf.model.state_dict(), hf.model.config, embedded_gguf_path(), "base", "f16")


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    from fteval.data.formatting import format_prompt

    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def llama_logits(model_path, ids_list, lora_path=None) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=256,
                          logits_all=True, n_threads=1, verbose=False)
    try:
        out = []
        for ids in ids_list:
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)]))
        return out
    finally:
        llm.close()


def hf_logits(model, ids_list) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].numpy() for ids in ids_list]


@needs_llama
def test_lora_gguf_logits_match_hf_peft(exported, hf, base_f16):
    from peft import PeftModel

    ids = [prompt_ids(hf.tokenizer, p) for p in PROMPTS]
    peft = PeftModel.from_pretrained(hf.model, str(exported)).eval()
    with_adapter = hf_logits(peft, ids)
    with peft.disable_adapter():
        without = hf_logits(peft, ids)
    got = llama_logits(base_f16, ids, exported / "gguf" / "adapter-f16.gguf")
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, with_adapter))
    effect = max(float(np.abs(a - b).max()) for a, b in zip(with_adapter, without))
    assert diff <= F16_TOLERANCE
    assert effect > 10 * F16_TOLERANCE  # the adapter moves the logits far more than the tolerance allows
    agree = np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, with_adapter)]))
    assert agree >= 0.97


def test_lora_tensors_scale_and_reorder(tmp_path, hf):
    """rsLoRA's scaling is folded into B; q/k rows of B are reordered per head, the others are not."""
    from fteval.io import check_adapter_folder
    from fteval.models.gguf_export import lora_tensors, permute_rotary_rows

    adapter = make_full_adapter(tmp_path / "rs", use_rslora=True)
    from safetensors.torch import load_file

    state = load_file(str(adapter / "adapter_model.safetensors"))
    tensors, alpha = lora_tensors(adapter, check_adapter_folder(adapter), hf.model.config)
    assert alpha == 8.0 and len(tensors) == 2 * 7 * 30
    prefix = "base_model.model.model.layers.3."
    factor = (8 / 4**0.5) * 4 / 8  # PEFT's rsLoRA scaling alpha/sqrt(r), times r/alpha (llama.cpp divides by r)
    b_v = state[prefix + "self_attn.v_proj.lora_B.weight"].numpy()
    np.testing.assert_allclose(tensors["blk.3.attn_v.weight.lora_b"], b_v * factor, rtol=1e-6)
    b_k = state[prefix + "self_attn.k_proj.lora_B.weight"].numpy()
    np.testing.assert_allclose(tensors["blk.3.attn_k.weight.lora_b"], permute_rotary_rows(b_k * factor, 3), rtol=1e-6)
    assert not np.allclose(tensors["blk.3.attn_k.weight.lora_b"], b_k * factor)
    np.testing.assert_array_equal(tensors["blk.3.ffn_down.weight.lora_a"], state[prefix + "mlp.down_proj.lora_A.weight"].numpy())


def test_permute_rotary_rows_is_the_interleaving():
    from fteval.models.gguf_export import GGUFExportError, permute_rotary_rows

    w = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads of 4 rows: [0 1 | 2 3], [4 5 | 6 7]
    assert permute_rotary_rows(w, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    with pytest.raises(GGUFExportError, match="cannot hold 3 rotary heads"):
        permute_rotary_rows(w, 3)


@needs_llama
@pytest.mark.parametrize(("outtype", "tolerance", "min_agree"), [("f16", F16_TOLERANCE, 0.97), ("bf16", 1.0, 0.95), ("q8_0", 3.0, 0.95)])
def test_merged_gguf_logits_match_the_merged_model(exported, hf, tmp_path, outtype, tolerance, min_agree):
    from fteval.models.merge import merged_model

    out = tmp_path / outtype
    main(["export", str(exported), "--merged", "true", "--outtype", outtype, "--quantization", "none",
          "--output", str(out)])
    model, _ = merged_model(exported, quantization="none")
    ids = [prompt_ids(hf.tokenizer, p) for p in PROMPTS]
    ref = hf_logits(model.eval(), ids)
    got = llama_logits(out / f"model-{outtype}.gguf", ids)
    diff = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    assert diff <= tolerance
    assert np.mean(np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)])) >= min_agree
    modelfile = (out / "Modelfile").read_text().splitlines()
    assert f"FROM ./model-{outtype}.gguf" in modelfile and not any(line.startswith("ADAPTER") for line in modelfile)


def test_modelfile_is_well_formed(exported):
    import gguf

    folder = exported / "gguf"
    lines = [line for line in (folder / "Modelfile").read_text().splitlines() if line and not line.startswith("#")]
    instructions = [line.split(" ", 1) for line in lines]
    assert [i[0] for i in instructions] == ["FROM", "ADAPTER", "PARAMETER", "PARAMETER"]
    base = instructions[0][1]
    adapter = folder / instructions[1][1]
    assert base.endswith(".gguf") and gguf.GGUFReader(base).fields["general.type"].contents() == "model"
    reader = gguf.GGUFReader(str(adapter))
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert {t.name for t in reader.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.29.ffn_down.weight.lora_b"}
    assert instructions[2][1] == "temperature 0" and instructions[3][1] == "repeat_penalty 1"
    record = json.loads((folder / "export.json").read_text())
    assert record["file"] == "adapter-f16.gguf" and record["merged"] is False


def _refused(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert len(err.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in err
    return err


def test_refuses_unknown_architectures_and_lora_variants(tmp_path, capsys, exported):
    import shutil

    gpt2 = tmp_path / "gpt2-base"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8}))
    foreign = tmp_path / "foreign"
    shutil.copytree(exported, foreign, ignore=shutil.ignore_patterns("gguf"))
    cfg = json.loads((foreign / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(gpt2)}))
    _refused(capsys, ["export", str(foreign)], "architecture 'gpt2' cannot be exported to GGUF", "supported: llama")
    assert not (foreign / "gguf").exists()

    dora = tmp_path / "dora"
    shutil.copytree(exported, dora, ignore=shutil.ignore_patterns("gguf"))
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    _refused(capsys, ["export", str(dora)], "use_dora", "--merged")
    assert not (dora / "gguf").exists()


def test_refuses_a_base_gguf_of_another_model(tmp_path, capsys, exported):
    import gguf

    other = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(other), arch="llama")
    writer.add_block_count(2)
    writer.add_embedding_length(64)
    writer.add_head_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((8, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _refused(capsys, ["export", str(exported), "--merged", "true", "--base_gguf", str(other), "--output",
                      str(tmp_path / "o")], "does not describe this model (llama.block_count = 2, the model has 30)",
             "--base_gguf")
    assert not (tmp_path / "o").exists()


def test_refuses_bad_inputs(tmp_path, capsys, exported):
    _refused(capsys, ["export", str(tmp_path)], "is not a PEFT adapter folder")
    _refused(capsys, ["export", str(exported)], "already exists and is not empty", "--overwrite")
    _refused(capsys, ["export", str(exported), "--outtype", "q4_k", "--output", str(tmp_path / "o")], "outtype")
    _refused(capsys, ["export", str(exported), "--base_gguf", str(tmp_path / "missing.gguf"),
                      "--output", str(tmp_path / "o")], "missing.gguf does not exist")
    assert not (tmp_path / "o").exists()
