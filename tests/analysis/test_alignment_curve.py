"""Alignment over training in compare: the monitor's curve read back, the checkpoint rule, rows, markdown, chart."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from fteval.analysis import charts
from fteval.analysis.alignment_curve import alignment_checks, checkpoint_files, choose_checkpoint
from fteval.analysis.compare import compare
from fteval.analysis.runs import RunSummary
from fteval.db import ExperimentDB


def _run(delta, low, high, loss, steps=(10, 20, 30, 40)) -> RunSummary:
    s = np.asarray(steps)
    curves = {"train/loss": (np.arange(1, steps[-1] + 1), np.asarray(loss, dtype=float)),
              "align/delta_aqi_bounded": (s, np.asarray(delta, dtype=float)),
              "align/delta_aqi_bounded_low": (s, np.asarray(low, dtype=float)),
              "align/delta_aqi_bounded_high": (s, np.asarray(high, dtype=float)),
              "align/aqi_bounded": (s, np.full(len(s), 0.5))}
    return RunSummary(id=7, name="grit-7", method="grit", status="finished", seed=1, device="cpu", device_name="CPU",
                      world_size=1, started_at="", curves=curves)


def test_checks_carry_the_smoothed_loss_at_their_step():
    loss = np.linspace(4.0, 1.0, 40)  # strictly falling: the trailing mean of 5 lags the raw value by 2 steps
    run = _run([0.0, -0.01, -0.02, -0.03], [-0.1] * 4, [0.1] * 4, loss)
    checks = alignment_checks(run)
    assert [c.step for c in checks] == [10, 20, 30, 40]
    assert checks[1].loss == pytest.approx(np.mean(loss[15:20]))
    assert checks[0].value == 0.5 and checks[0].value_low is None  # not recorded -> None
    assert alignment_checks(RunSummary(id=1, name="q", method="qlora", status="finished", seed=0, device="cpu",
                                       device_name="CPU", world_size=1, started_at="",
                                       curves={"train/loss": (np.arange(1, 3), np.ones(2))})) == []


def test_the_rule_skips_eroded_checks_and_prefers_low_loss():
    loss = np.linspace(4.0, 1.0, 40)
    # the lowest loss is at step 40, but its interval is wholly below 0: step 30 is the choice
    run = _run([0.0, -0.01, -0.02, -0.08], [-0.05, -0.06, -0.07, -0.12], [0.05, 0.04, 0.03, -0.04], loss)
    choice = choose_checkpoint(run, alignment_checks(run))
    assert choice.check.step == 30 and choice.first_eroded_step == 40 and choice.lowest.step == 40
    assert "passed over" in choice.reason and choice.n_checks == 4


def test_the_rule_when_every_check_eroded_and_with_saved_checkpoints(tmp_path):
    loss = np.linspace(4.0, 1.0, 40)
    run = _run([-0.05, -0.03, -0.06, -0.09], [-0.08, -0.06, -0.09, -0.12], [-0.02, -0.001, -0.03, -0.05], loss)
    choice = choose_checkpoint(run, alignment_checks(run))
    assert choice.check.step == 20 and "least eroded" in choice.reason  # the largest upper bound
    # only steps with a saved checkpoint are candidates
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("epoch=0-step=10.ckpt", "epoch=0-step=30.ckpt", "last.ckpt"):
        (folder / name).write_bytes(b"x")
    files = checkpoint_files(folder)
    assert sorted(files) == [10, 30]
    run = _run([0.0, -0.01, -0.02, -0.03], [-0.1] * 4, [0.1] * 4, loss)
    choice = choose_checkpoint(run, alignment_checks(run, checkpoints=files))
    assert choice.check.step == 30 and choice.check.checkpoint.endswith("step=30.ckpt")
    assert checkpoint_files(tmp_path / "missing") == {} and choose_checkpoint(run, []) is None


def _add_curve(db_path, method: str, deltas: list[float]) -> tuple[int, list[int]]:
    with ExperimentDB(db_path) as db:
        exp = next(e for e in db.experiments() if e["method"] == method)
        steps = db.rows("training_metrics", experiment_id=exp["id"])
        last = max(r["step"] for r in steps)
        marks = np.linspace(last // 3, last, 3).astype(int)
        rows = []
        for step, d in zip(marks, deltas):
            rows += [(int(step), "align/delta_aqi_bounded", d), (int(step), "align/delta_aqi_bounded_low", d - 0.02),
                     (int(step), "align/delta_aqi_bounded_high", d + 0.02), (int(step), "align/aqi_bounded", 0.4 + d)]
        db.log_training_metrics(exp["id"], method, rows)
        return exp["id"], [int(m) for m in marks]


def test_compare_reports_the_curve_and_the_chosen_checkpoint(run_db, tmp_path):
    qlora, marks = _add_curve(run_db, "qlora", [0.01, -0.01, -0.05])  # the last check eroded alignment
    _add_curve(run_db, "grit", [0.0, 0.01, 0.0])
    out = tmp_path / "m04"
    assert compare(db_path=run_db, output_dir=out) == 0
    text = (out / "comparison.md").read_text()
    assert "## Alignment over training" in text and "passed over" in text
    con = sqlite3.connect(run_db)
    rows = con.execute("SELECT subject, value, details_json FROM comparative_analysis WHERE metric = 'checkpoint_step' "
                       "ORDER BY subject").fetchall()
    assert [r[0] for r in rows] == ["grit#2", f"qlora#{qlora}"]
    details = json.loads(rows[1][2])
    assert details["first_eroded_step"] == marks[2] and details["lowest_delta"] == {"step": marks[2], "delta": -0.05}
    assert rows[1][1] == marks[1] and details["delta_aqi_bounded"] == pytest.approx(-0.01)  # lower loss than marks[0]
    assert details["delta_ci"] == pytest.approx([-0.03, 0.01]) and details["n_checks"] == 3
    if charts.matplotlib_available():
        assert (out / "alignment_over_training.png").stat().st_size > 1000
