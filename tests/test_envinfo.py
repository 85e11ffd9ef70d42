"""Environment manifest, `fteval env`, and its --check of configs against the machine."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from fteval.db import ExperimentDB
from fteval.envinfo import (
    check_config,
    collect_manifest,
    env,
    git_commit,
    hf_token_source,
    load_config,
)
from fteval.io import write_atomic, write_json_atomic


def _manifest(cuda: bool = True, bf16: bool = True, bnb: str | None = "0.50.2", bnb_cuda: bool = True,
              flash: bool = True, n_gpus: int = 1) -> dict:
    gpus = [{"index": i, "name": "NVIDIA H200" if bf16 else "Tesla V100", "memory_gib": 139.8,
             "capability": "9.0" if bf16 else "7.0", "bf16": bf16} for i in range(n_gpus if cuda else 0)]
    return {
        "packages": {"torch": "2.11.0", "bitsandbytes": bnb, "flash-attn": "2.8" if flash else None},
        "hardware": {"cuda_available": cuda, "cuda_version": "12.8" if cuda else None, "gpus": gpus,
                     "bf16_supported": bf16 if cuda else None, "bitsandbytes_cuda": bnb_cuda if cuda else False,
                     "flash_attn_importable": flash},
    }


QLORA_GPU = {
    "trainer": {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"},
    "model": {"class_path": "fteval.models.QLoRAModule",
              "init_args": {"model": {"quantize": "nf4", "attn_implementation": "flash_attention_2"}}},
}


def test_manifest_describes_this_machine():
    m = collect_manifest()
    assert m["packages"]["torch"] == torch.__version__
    assert set(m["packages"]) >= {"lightning", "transformers", "peft", "bitsandbytes", "flash-attn"}
    assert m["packages"]["flash-attn"] is None or m["hardware"]["flash_attn_importable"]
    hw = m["hardware"]
    assert hw["cuda_available"] == torch.cuda.is_available()
    assert len(hw["gpus"]) == (torch.cuda.device_count() if hw["cuda_available"] else 0)
    assert hw["cpu_count"] >= 1 and hw["ram_gib"] > 0.1
    assert isinstance(m["hf_token_present"], bool)
    json.dumps(m)  # serialisable as it is


def test_hf_token_source(tmp_path):
    missing = tmp_path / "no-token"
    assert hf_token_source({}, missing) is None
    assert hf_token_source({"HF_TOKEN": "  "}, missing) is None
    assert hf_token_source({"HF_TOKEN": "x"}, missing) == "env:HF_TOKEN"
    assert hf_token_source({"HUGGING_FACE_HUB_TOKEN": "x"}, missing) == "env:HUGGING_FACE_HUB_TOKEN"
    token_file = tmp_path / "token"
    token_file.write_text("")
    assert hf_token_source({}, token_file) is None
    token_file.write_text("hf_abc")
    assert hf_token_source({}, token_file) == "file"


def test_token_never_reaches_manifest_or_database(tmp_path, monkeypatch, capsys):
    secret = f"hf_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", secret)
    out, db_path = tmp_path / "m01", tmp_path / "c.db"
    assert env(out, db_path) == 0
    manifest_text = (out / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["hf_token_present"] is True and manifest["hf_token_source"] == "env:HF_TOKEN"
    db_files = [p for p in tmp_path.iterdir() if p.name.startswith("c.db")]
    assert db_files
    for blob in [manifest_text.encode(), capsys.readouterr().out.encode(), *(p.read_bytes() for p in db_files)]:
        assert secret.encode() not in blob and secret[3:20].encode() not in blob
    with ExperimentDB(db_path) as db:
        row = db.rows("environment")[0]
    assert row["hf_token_present"] == 1 and row["manifest"]["packages"]["torch"] == torch.__version__


def test_env_writes_manifest_and_db_row(tmp_path, capsys):
    assert env(tmp_path / "m01", tmp_path / "c.db") == 0
    assert env(tmp_path / "m01", tmp_path / "c.db") == 0  # a second run replaces the manifest, adds a row
    printed = capsys.readouterr().out
    assert "torch" in printed and "HF token" in printed
    manifest = json.loads((tmp_path / "m01" / "manifest.json").read_text())
    assert manifest["python"].count(".") == 2
    assert sorted(p.name for p in (tmp_path / "m01").iterdir()) == ["manifest.json"]  # no temp files left
    with ExperimentDB(tmp_path / "c.db") as db:
        assert len(db.rows("environment")) == 2


def test_check_config_reasons():
    assert check_config(QLORA_GPU, _manifest()) == []
    no_cuda = check_config(QLORA_GPU, _manifest(cuda=False))
    assert any("CUDA is not available" in r for r in no_cuda)
    assert any("FlashAttention needs a CUDA GPU" in r for r in no_cuda)
    assert len(check_config(QLORA_GPU, _manifest(bf16=False))) == 1
    assert "no bf16 support" in check_config(QLORA_GPU, _manifest(bf16=False))[0]
    assert "bitsandbytes is not installed" in check_config(QLORA_GPU, _manifest(bnb=None))[0]
    assert "could not load its CUDA library" in check_config(QLORA_GPU, _manifest(bnb_cuda=False))[0]
    assert "flash_attn is not installed" in check_config(QLORA_GPU, _manifest(flash=False))[0]
    two = {**QLORA_GPU, "trainer": {**QLORA_GPU["trainer"], "devices": 2}}
    assert "has 1 GPU(s)" in check_config(two, _manifest())[0]
    assert check_config(two, _manifest(n_gpus=2)) == []
    # tolerant lookups: flat model keys, load_in_4bit, a missing trainer section, fp16 on CPU
    flat = {"model": {"load_in_4bit": True, "attn_implementation": "sdpa"}, "trainer": {"accelerator": "gpu"}}
    assert "4-bit" in check_config(flat, _manifest(bnb=None))[0]
    assert check_config({}, _manifest(cuda=False)) == []
    cpu16 = {"trainer": {"accelerator": "cpu", "precision": "16-mixed"}}
    assert "only bf16" in check_config(cpu16, _manifest(cuda=False))[0]
    assert check_config({"trainer": {"accelerator": "cpu", "precision": "bf16-mixed"}}, _manifest(cuda=False)) == []
    # accelerator auto on a machine without CUDA runs on CPU: bf16 and 4-bit (bitsandbytes CPU) are fine
    auto = {"trainer": {"precision": "bf16-mixed"}, "model": {"init_args": {"quantize": "nf4"}}}
    assert check_config(auto, _manifest(cuda=False)) == []


def test_env_check_exit_code(tmp_path, capsys):
    cfg = tmp_path / "gpu.yaml"
    cfg.write_text("trainer:\n  accelerator: gpu\n  precision: bf16-mixed\nmodel:\n  init_args:\n"
                   "    attn_implementation: flash_attention_2\n")
    code = env(tmp_path / "m01", tmp_path / "c.db", check=cfg)
    manifest = json.loads((tmp_path / "m01" / "manifest.json").read_text())
    expected = check_config(load_config(cfg), manifest)
    assert code == (1 if expected else 0)
    assert manifest["check"] == {"config": str(cfg), "ok": not expected, "reasons": expected}
    if not torch.cuda.is_available():
        assert code == 1 and "cannot run it" in capsys.readouterr().out
    ok = tmp_path / "cpu.yaml"
    ok.write_text("trainer:\n  accelerator: cpu\n  precision: 32-true\n")
    assert env(tmp_path / "m01", tmp_path / "c.db", check=ok) == 0


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(bad)
    with pytest.raises(FileNotFoundError):
        env(tmp_path / "m01", tmp_path / "c.db", check=tmp_path / "nope.yaml")
    assert not (tmp_path / "m01").exists()  # nothing written when the config is missing


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "m.json"
    write_json_atomic(target, {"a": 1}, canonical=True)
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()}, canonical=True)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]

    def half_written(tmp):
        tmp.write_text('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_written)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]
    assert target.read_text() == '{\n  "a": 1\n}\n'  # canonical: sorted keys, final newline


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "f").write_text("x")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "m")
    sha = git_commit(tmp_path)
    assert sha is not None and len(sha) == 40 and int(sha, 16) >= 0
    assert git_commit(Path(tmp_path / "missing")) is None
