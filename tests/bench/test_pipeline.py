"""``fteval bench pipeline``: every stage of the experiment timed in one work folder, on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fteval.bench.pipeline import bench_pipeline, build_random_checkpoint

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_random_checkpoint_has_the_tokenizer_and_its_vocabulary(tmp_path):
    from transformers import AutoConfig

    from fteval.models.loading import load_tokenizer

    out = build_random_checkpoint("tiny", "embedded", tmp_path / "m")
    tok = load_tokenizer(str(out))
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.vocab_size == len(tok) == 49152
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 2
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_whole_pipeline_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    rc = bench_pipeline(
        output_dir=out, model="tiny", configs=CONFIGS, methods=["qlora"],
        fit_args=["--trainer.max_steps", "2", "--trainer.val_check_interval", "2"],
        test_args=["--model.init_args.adapters", "{qlora: output/m03a_qlora_training/adapter}", "--data.n_per_class", "6", "--model.init_args.behaviour_prompts_per_class", "2",
                   "--model.init_args.max_new_tokens", "4"],
        generation_check=True, reference_batch_size=2,
    )
    assert rc == 0
    report = json.loads((out / "pipeline.json").read_text())
    stages = [r["stage"] for r in report["stages"]]
    assert stages[:5] == ["build", "fit:qlora", "test", "compare", "report"]
    assert stages[5:] == ["generation:reference", "generation:configured", "generation:configured+static"]
    for row in report["stages"]:
        assert row["rc"] == 0 and row["seconds"] > 0 and row["peak_gib"] > 0, row
    by = {r["stage"]: r for r in report["stages"]}
    assert by["fit:qlora"]["tokens_per_s"] > 0 and by["test"]["tokens_per_s"] > 0
    assert report["pipeline_seconds"] == pytest.approx(sum(by[s]["seconds"] for s in stages[:5]), abs=0.2)
    check = report["generation_check"]
    assert check["n_prompts"] == 20  # configs/aqi.yaml: 10 prompts per class
    assert check["reference"]["agreement_first_32_tokens"]["exact"] == 1.0
    # a static cache changes no greedy answer on the CPU (same kernels, fp32)
    assert check["configured+static"]["cache"] == "static"
    assert check["configured+static"]["agreement_first_32_tokens"]["exact"] >= 0.9
    table = (out / "pipeline.md").read_text()
    assert "| fit:qlora |" in table and "**pipeline**" in table
    assert (out / "output" / "m07_results_synthesis" / "report.md").is_file()


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml does not exist; --configs names the folder"):
        bench_pipeline(output_dir=tmp_path / "a", configs=CONFIGS, methods=["nope"])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite true"):
        bench_pipeline(output_dir=busy, configs=CONFIGS)
    assert (busy / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="graph_check_steps=-1 must be >= 0"):
        bench_pipeline(output_dir=tmp_path / "b", configs=CONFIGS, graph_check_steps=-1)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
