"""Bad model paths, mismatched merges, long CSV cells, an unreachable hub: one line, exit 2, nothing written."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import pytest
import yaml

from fteval.io import atomic_directory
from fteval.models.loading import ModelLoadError, embedded_gguf_path, materialise_embedded, resolve_model_path
from tests.test_concurrent_runs import TEST
from tests.test_user_errors import _run


def _model_folder(tmp_path: Path, weights: bytes) -> Path:
    """The embedded model's config and tokenizer with ``weights`` as its model.safetensors."""
    folder = tmp_path / "model"
    shutil.copytree(materialise_embedded(), folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_random_bytes_as_weights_are_one_line(tmp_path, capsys, monkeypatch):
    folder = _model_folder(tmp_path, bytes(range(256)) * 64)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(TEST))
    err = _run(["test", "--config", "test.yaml", "--model.init_args.model_name_or_path", str(folder)], capsys)
    assert f"model folder {folder} could not be loaded" in err and "save it again with save_pretrained" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "test.yaml"]  # no log folder, no database


def test_a_file_that_is_not_a_model_folder_says_what_to_pass(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="is a file; pass the folder written by save_pretrained"):
        resolve_model_path(str(tmp_path / "weights.bin"))


def test_a_gguf_file_is_converted_once_and_loads(tmp_path):
    cache = tmp_path / "cache"
    folder = Path(resolve_model_path(str(embedded_gguf_path()), cache))
    assert folder.parent == cache / "models" and folder.name.startswith("gguf-SmolLM2-135M-Instruct.Q4_1-")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").stat().st_size > 100_000_000
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path(str(embedded_gguf_path()), cache) == str(folder)  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_unreachable_hub_fails_at_once(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr("urllib.request.getproxies", lambda: {})
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="cannot be reached") as err:
        resolve_model_path("nobody-here/no-such-model-7f3a")
    assert time.perf_counter() - start < 6 and "nobody-here/no-such-model-7f3a" in str(err.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set"):
        resolve_model_path("nobody-here/no-such-model-7f3a")


def test_merge_with_an_adapter_of_another_base_is_one_line(tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.eval.test_module import make_adapter

    adapter = make_adapter(tmp_path / "adapter", 0.05)
    other = tmp_path / "other-base"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=49152)).save_pretrained(other)
    AutoTokenizer.from_pretrained(materialise_embedded()).save_pretrained(other)
    capsys.readouterr()
    err = _run(["merge", str(adapter), str(tmp_path / "merged"), "--base_model", str(other), "--quantization", "none"],
               capsys)
    assert f"does not fit the base model {str(other)!r}" in err and "it was trained on 'embedded'" in err
    assert not (tmp_path / "merged").exists()


def test_overwrite_keeps_a_users_file_of_the_same_name(tmp_path):
    target = tmp_path / "merged"
    with atomic_directory(target, overwrite=False, keep_foreign=True) as tmp:
        (tmp / "model.safetensors").write_text("fteval 1")
    (target / "config.json").write_text("the user's own")  # same name as a file the next write brings
    with pytest.raises(FileExistsError, match="holds config.json, not written by fteval"):
        with atomic_directory(target, overwrite=True, keep_foreign=True) as tmp:
            (tmp / "model.safetensors").write_text("fteval 2")
            (tmp / "config.json").write_text("fteval 2")
    assert (target / "config.json").read_text() == "the user's own"
    assert (target / "model.safetensors").read_text() == "fteval 1"  # nothing changed
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no temporary folder left
    with atomic_directory(target, overwrite=True, keep_foreign=True) as tmp:  # its own files: replaced
        (tmp / "model.safetensors").write_text("fteval 3")
    assert (target / "model.safetensors").read_text() == "fteval 3" and (target / "config.json").is_file()


def test_classify_refusals_reads_csv_cells_over_131072_characters(tmp_path, capsys):
    from fteval.__main__ import main

    long_answer = "I can't help with that. " + "x" * 200_000
    src = tmp_path / "answers.csv"
    with src.open("w", newline="") as fh:
        csv.writer(fh).writerows([["completion"], [long_answer], ["Sure, here it is."]])
    main(["classify-refusals", str(src), "--column", "completion"])
    out = tmp_path / "answers.labelled.csv"
    from fteval.io import csv_reader

    with out.open(newline="") as fh:
        rows = list(csv_reader(fh))
    assert [len(r["completion"]) for r in rows] == [len(long_answer), 17]
    assert [r["refusal_label"] for r in rows] == ["full_refusal", "compliance"]


def test_ctrl_c_in_a_tool_command_is_one_line(monkeypatch, capsys):
    from fteval import __main__ as cli

    def env(check: str = "") -> int:
        """Stands in for a command interrupted by Ctrl-C."""
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_commands", lambda: {"env": env})
    with pytest.raises(SystemExit) as exit_:
        cli.main(["env"])
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("fteval: interrupted (Ctrl-C)") and "Traceback" not in err and len(err.splitlines()) == 1
