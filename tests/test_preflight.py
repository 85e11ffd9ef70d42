"""Output folders that cannot take the run's files are refused before any model loads."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from fteval.preflight import FREE_SPACE_MARGIN, OutputFolderError, adapter_bytes_estimate, check_output_folders
from tests.test_concurrent_runs import FIT, TEST
from tests.test_user_errors import _run

Usage = namedtuple("Usage", "total used free")


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if a model is loaded: every refusal below must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folders were checked")

    monkeypatch.setattr("fteval.eval.module.load_causal_lm", refuse)
    monkeypatch.setattr("fteval.models.base.load_causal_lm", refuse, raising=False)


def test_unwritable_results_folder_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(TEST))
    err = _run(["test", "--config", "test.yaml", "--model.init_args.results_dir", "/proc/fteval-results"], capsys)
    assert "--model.init_args.results_dir=/proc/fteval-results cannot be written" in err
    (tmp_path / "a_file").write_text("x")
    err = _run(["test", "--config", "test.yaml", "--model.init_args.results_dir", "a_file/results"], capsys)
    assert "is a file, not a folder" in err and "--model.init_args.results_dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "test.yaml"]  # no log folder, no database


def test_full_disk_is_refused_before_a_fit_with_the_estimate(tmp_path, capsys, monkeypatch, no_model_load):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(FIT))
    monkeypatch.setattr("fteval.preflight.shutil.disk_usage", lambda p: Usage(10 << 30, 10 << 30, 5 << 20))
    err = _run(["fit", "--config", "fit.yaml", "--model.init_args.export_dir", "out/adapter"], capsys)
    assert "only 5 MiB free" in err and "needs about 65 MiB" in err  # margin + 4 x the r=2 q_proj adapter
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(TEST))
    err = _run(["test", "--config", "test.yaml", "--model.init_args.save_embeddings", "true", "--data.n_per_class", "100"],
               capsys)
    assert "needs about 78 MiB" in err  # margin + 200 prompts x 32 x 576 fp32 (every layer and the pooled vector)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit.yaml", "test.yaml"]


def test_adapter_estimate_matches_the_module_shapes():
    cfg = type("Cfg", (), dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                               num_hidden_layers=30))()
    # SmolLM2-135M: q 576->576, k/v 576->192, o 576->576, gate/up 576->1536, down 1536->576
    per_layer = (1152 + 768 + 768 + 1152 + 2112 * 3)
    assert adapter_bytes_estimate(cfg, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]) == 4 * 16 * per_layer * 30
    assert adapter_bytes_estimate(cfg, 2, ["q_proj"]) == 4 * 2 * 1152 * 30


def test_check_output_folders_counts_the_margin(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    check_output_folders([(tmp_path / "new" / "deeper", "--x")], need_bytes=0)
    assert not (tmp_path / "new").exists()  # checked through the nearest existing parent, nothing created
    with pytest.raises(OutputFolderError, match="--x="):
        check_output_folders([(tmp_path, "--x")], need_bytes=free - FREE_SPACE_MARGIN + (1 << 30))
