"""Runs started together: each gets its own version folder and its own database record; folder locks; SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fteval.db import ExperimentDB
from fteval.preflight import FolderLock, claim_version_dir

ROOT = Path(__file__).resolve().parents[1]

# The smallest real fit: 2 optimizer steps of batch 1 on 16 sample rows, LoRA r=2 on q_proj only.
FIT = {
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 0, "num_sanity_val_steps": 0,
                "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                           "init_args": {"save_dir": "lightning_logs", "name": "tiny"}},
                "callbacks": [{"class_path": "callbacks.run_logger.ExperimentDBLogger",
                               "init_args": {"db_path": "output/centralized.db"}}]},
    "model": {"class_path": "fteval.models.QLoRAModule",
              "init_args": {"quantization": "none", "r": 2, "alpha": 4, "target_modules": ["q_proj"]}},
    "data": {"max_train_samples": 16, "max_length": 48, "batch_size": 1, "n_per_class": 4},
}
TEST = {
    "trainer": {**FIT["trainer"], "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                             "init_args": {"save_dir": "lightning_logs", "name": "aqi"}}},
    "model": {"class_path": "fteval.eval.AQIEvaluator",
              "init_args": {"quantization": "none", "behaviour": False, "n_bootstrap": 0, "save_embeddings": False}},
    "data": {"n_per_class": 4, "eval_batch_size": 8},
}


def _together(cwd: Path, commands: list[list[str]]) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "fteval", *c], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in commands]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def _config_yaml(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_two_fits_and_two_tests_started_together_keep_their_own_records(tmp_path):
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(FIT))
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(TEST))
    _together(tmp_path, [["fit", "--config", "fit.yaml", "--seed_everything", str(seed), "--data.n_per_class", str(n)]
                         for seed, n in ((1, 10), (2, 12))])
    _together(tmp_path, [["test", "--config", "test.yaml", "--seed_everything", str(seed), "--data.n_per_class", str(n),
                          "--model.init_args.results_dir", f"results_{n}"] for seed, n in ((3, 4), (4, 5))])

    fits = sorted((tmp_path / "lightning_logs" / "tiny").iterdir())
    tests = sorted((tmp_path / "lightning_logs" / "aqi").iterdir())
    assert [p.name for p in fits] == ["version_0", "version_1"] and [p.name for p in tests] == ["version_0", "version_1"]
    for run_dir in fits:  # each folder holds its own run's config and its own adapter
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(_config_yaml(d)["seed_everything"] for d in fits) == [1, 2]
    assert sorted(_config_yaml(d)["seed_everything"] for d in tests) == [3, 4]

    with ExperimentDB(tmp_path / "output" / "centralized.db") as db:
        rows = db.experiments()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    recorded = set()
    for row in rows:
        config = row["config"]
        seed, n = config["cli"]["seed_everything"], config["cli"]["data"]["n_per_class"]
        assert row["seed"] == seed  # the row names its own run's settings, never the other run's
        recorded.add((row["stage"], seed, n))
    assert recorded == {("fit", 1, 10), ("fit", 2, 12), ("test", 3, 4), ("test", 4, 5)}
    for n in (4, 5):
        results = json.loads((tmp_path / f"results_{n}" / "aqi_results.json").read_text())
        assert len(results["prompts"]) == 2 * n


def test_version_claims_never_collide(tmp_path):
    claims = [claim_version_dir(tmp_path) for _ in range(3)]
    assert claims == ["version_0", "version_1", "version_2"]
    (tmp_path / "version_7").mkdir()
    assert claim_version_dir(tmp_path) == "version_8"


def test_a_locked_results_folder_stops_a_second_test_at_once(tmp_path, capsys, monkeypatch):
    from tests.test_user_errors import _run

    monkeypatch.chdir(tmp_path)
    lock = FolderLock(tmp_path / "results", "--model.init_args.results_dir").acquire()
    try:
        with pytest.raises(FileExistsError, match="another run"):
            FolderLock(tmp_path / "results", "x").acquire()
        (tmp_path / "test.yaml").write_text(yaml.safe_dump(TEST))
        err = _run(["test", "--config", "test.yaml", "--model.init_args.results_dir", "results"], capsys)
    finally:
        lock.release()
    assert f"(pid {os.getpid()}) is writing to {tmp_path / 'results'}" in err and "--model.init_args.results_dir" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.yaml"]  # no log folder, no database
    FolderLock(tmp_path / "results", "x").acquire().release()  # released: free again


def test_sigterm_stops_a_test_run_at_the_next_batch(tmp_path):
    """SIGTERM during ``fteval test`` (sent at batch 2 of 35): no further batch runs, exit 143 with one line, the
    row ``interrupted``, no results written."""
    import signal

    from tests.conftest import accd_rows, write_jsonl

    write_jsonl(tmp_path / "accd.jsonl", accd_rows(35, 35))
    config = {**TEST, "trainer": {**TEST["trainer"], "callbacks": [
        *TEST["trainer"]["callbacks"], {"class_path": "tests.resume.killer.TermAt", "init_args": {"batch": 2}}]}}
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fteval", "test", "--config", "test.yaml", "--data.eval_source",
                           "accd.jsonl", "--data.n_per_class", "35", "--data.eval_batch_size", "2"], cwd=tmp_path, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 128 + signal.SIGTERM and "fteval: stopped by SIGTERM" in out, out[-2000:]
    assert "test batches started after SIGTERM: 0" in out, out[-2000:]
    with ExperimentDB(tmp_path / "output" / "centralized.db") as db:
        (row,) = db.experiments()
    assert row["status"] == "interrupted"
    assert not (tmp_path / "output" / "m06_comprehensive_evaluation").exists()  # no results of a stopped run
