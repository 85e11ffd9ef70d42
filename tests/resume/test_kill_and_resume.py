"""kill -9 in the middle of a fit, resume from last.ckpt: the same losses and bitwise the same adapter."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS, ACCUMULATE = 6, 2


def _config(method: str, tmp: Path, kill_at: int | None) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / f"{method}.yaml").read_text())
    t = cfg["trainer"]
    t.update(max_steps=MAX_STEPS, accumulate_grad_batches=ACCUMULATE, val_check_interval=None, limit_val_batches=0,
             enable_progress_bar=False)
    t["logger"]["init_args"]["save_dir"] = str(tmp / "lightning_logs")
    callbacks = []
    for cb in t["callbacks"]:
        args = cb.setdefault("init_args", {}) or {}
        cb["init_args"] = args
        name = cb["class_path"].rsplit(".", 1)[-1]
        if name == "ModelCheckpoint":
            args.update(every_n_train_steps=2, save_last=True, save_top_k=-1)
        if name == "ExperimentDBLogger":
            args["db_path"] = str(tmp / "db.sqlite")
        if name == "KFACPreconditioner":  # factors refreshed on both sides of the kill
            args.update({k: v for k, v in {"update_freq": 2, "min_samples": 16}.items() if k in args})
        if name == "NeuralReprojection":  # a reprojection after the resume point
            args["every_n_steps"] = 3
        callbacks.append(cb)
    if kill_at is not None:
        callbacks.append({"class_path": "tests.resume.killer.KillAt", "init_args": {"batch": kill_at}})
    t["callbacks"] = callbacks
    m = cfg["model"]["init_args"]
    m.update(r=4, alpha=8, target_modules=["q_proj", "v_proj"], warmup_steps=1, export_dir=str(tmp / "adapter"))
    cfg["data"].update(max_length=64, n_per_class=10)
    path = tmp / f"{method}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fteval", "fit", "--config", str(config), *extra], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _losses(tmp: Path, method: str) -> list[tuple[int, float]]:
    with sqlite3.connect(tmp / "db.sqlite") as con:
        return con.execute("SELECT step, value FROM training_metrics WHERE method = ? AND name = 'loss' ORDER BY step", (method,)).fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "grit"])
def test_kill_9_then_resume_equals_the_uninterrupted_run(method, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    res = _fit(_config(method, whole, None), whole)
    assert res.returncode == 0, res.stderr[-3000:]

    # Killed in the middle of optimizer step 4's accumulation (its first micro-batch done, 7 of 12);
    # last.ckpt holds step 2, so steps 3-6 are trained again after the resume.
    kill_at = 3 * ACCUMULATE + 1
    res = _fit(_config(method, broken, kill_at), broken)
    assert res.returncode == -9, res.stderr[-3000:]
    ckpt_dir = broken / "lightning_logs" / method / "version_0" / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_file() and not (broken / "adapter").exists()
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    with sqlite3.connect(broken / "db.sqlite") as con:
        assert con.execute("SELECT status FROM experiments").fetchall() == [("running",)]

    res = _fit(_config(method, broken, None), broken, "--ckpt_path", str(ckpt_dir / "last.ckpt"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (broken / "lightning_logs" / method).iterdir()) == ["version_0"]  # same folder

    expected, got = _losses(whole, method), _losses(broken, method)
    assert [s for s, _ in got] == list(range(1, MAX_STEPS + 1)) and got == expected  # exact floats, every step
    a, b = load_file(whole / "adapter" / "adapter_model.safetensors"), load_file(broken / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 30 * 2 * 2  # 30 layers x (q, v) x (A, B)
    for key in a:
        assert a[key].equal(b[key]), key  # bitwise
    with sqlite3.connect(broken / "db.sqlite") as con:
        assert con.execute("SELECT status FROM experiments").fetchall() == [("finished",)]
