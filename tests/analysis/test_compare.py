"""fteval compare: convergence figures, adapter sizes, significance tests, rows, markdown and PNG charts."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
from scipy import stats as sps

from fteval.analysis import charts
from fteval.analysis.compare import ANALYSIS, compare, training_tests
from fteval.analysis.runs import RunSummary, smooth, stability, steps_to_threshold
from fteval.db import ExperimentDB

from tests.analysis.tiny_run import EFFECTIVE_PARAMS, TRAINABLE


def _last(recorded: dict, method: str, name: str) -> float:
    exp = next(e for e in recorded["experiments"] if e["method"] == method)
    return [m for m in exp["metrics"] if m[1] == name][-1][2]


def _run(eid: int, method: str, loss: np.ndarray, seed: int = 42, **curves) -> RunSummary:
    steps = np.arange(1, loss.size + 1)
    data = {"train/loss": (steps, np.asarray(loss, dtype=float))}
    data.update({k.replace("__", "/"): (np.arange(1, len(v) + 1), np.asarray(v, dtype=float)) for k, v in curves.items()})
    return RunSummary(id=eid, name=f"{method}-{eid}", method=method, status="finished", seed=seed, device="cpu",
                      device_name="CPU", world_size=1, started_at="", curves=data)


# ----------------------------------------------------------------------------- definitions
def test_smooth_threshold_and_stability_on_known_numbers():
    values = np.array([4.0, 3.0, 2.0, 1.0, 0.0, 5.0])
    np.testing.assert_allclose(smooth(values, window=5), [4.0, 3.5, 3.0, 2.5, 2.0, 2.2])
    steps = np.array([10, 20, 30, 40, 50, 60])
    assert steps_to_threshold(steps, values, 3.0) == 30  # smoothed 3.0 first at the third logged step
    assert steps_to_threshold(steps, values, 1.0) is None
    # last 10 differences of [1, 2, 4, 7]: [1, 2, 3] -> std (ddof 1) = 1
    assert stability(np.array([1.0, 2.0, 4.0, 7.0])) == pytest.approx(1.0)
    assert math.isnan(stability(np.array([1.0, 2.0])))


def test_step_window_tests_are_paired_and_holm_corrected():
    rng = np.random.default_rng(0)
    a = 3.0 + rng.normal(0, 0.1, 12)
    b = a + 0.5  # B is worse at every matched step
    tests = training_tests([_run(1, "qlora", a), _run(2, "grit", b)])
    by_window = {t.details["window"]: t for t in tests}
    assert set(by_window) == {"all", "early", "middle", "late"}
    full = by_window["all"]
    assert (full.test, full.group_a, full.group_b, full.n) == ("wilcoxon_signed_rank", "qlora#1", "grit#2", 12)
    assert full.p_value == pytest.approx(2 / 2**12)  # exact two-sided signed-rank p, all 12 differences positive
    assert full.p_adjusted == pytest.approx(4 * 2 / 2**12)  # Holm, smallest of 4 p-values
    assert by_window["early"].p_value == pytest.approx(2 / 2**4)
    assert by_window["early"].details["steps"] == [1, 4]
    assert full.mean_b - full.mean_a == pytest.approx(0.5)


def test_across_seed_tests_use_welch_on_run_level_figures():
    rng = np.random.default_rng(1)
    runs = [_run(i + 1, m, 3.0 + shift + rng.normal(0, 0.05, 10), seed=s)
            for i, (m, shift, s) in enumerate([("qlora", 0.0, 1), ("qlora", 0.0, 2), ("qlora", 0.0, 3),
                                                ("grit", 0.4, 1), ("grit", 0.4, 2), ("grit", 0.4, 3)])]
    for r in runs:
        r.final_train_loss_smoothed = float(smooth(r.loss[1])[-1])
    tests = training_tests(runs)
    assert [t.test for t in tests] == ["welch_t"]  # only the smoothed final loss is set on these runs
    t = tests[0]
    qa = [r.final_train_loss_smoothed for r in runs[:3]]
    gb = [r.final_train_loss_smoothed for r in runs[3:]]
    assert t.p_value == pytest.approx(sps.ttest_ind(gb, qa, equal_var=False).pvalue)
    assert t.p_value < 0.01 and t.p_adjusted == pytest.approx(t.p_value)  # a family of one
    assert t.details["seeds_a"] == [1, 2, 3] and t.n == 6


# ----------------------------------------------------------------------------- the command
def test_compare_on_the_recorded_run(run_db, recorded, tmp_path):
    assert charts.matplotlib_available(), "matplotlib is missing: it must be a dependency (pyproject) for the PNG charts"
    out = tmp_path / "m04"
    assert compare(run_db, out) == 0

    md = (out / "comparison.md").read_text()
    q_final, g_final = _last(recorded, "qlora", "train/loss"), _last(recorded, "grit", "train/loss")
    assert f"{q_final:.4g}" in md and f"{g_final:.4g}" in md  # 4.779 and 4.828
    assert f"{_last(recorded, 'qlora', 'val/loss'):.4g}" in md  # 3.969
    assert f"{TRAINABLE:,}" in md and f"{EFFECTIVE_PARAMS:,}" in md
    for png in ("loss_curves.png", "efficiency.png", "effective_rank.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    with ExperimentDB(run_db) as db:
        rows = {(r["subject"], r["metric"]): r for r in db.rows("comparative_analysis", analysis=ANALYSIS)}
        tests = [t for t in db.rows("statistical_tests") if (t["details"] or {}).get("analysis") == ANALYSIS]
    assert rows[("qlora#1", "final_train_loss")]["value"] == pytest.approx(q_final)
    assert rows[("grit#2", "final_val_loss")]["value"] == pytest.approx(_last(recorded, "grit", "val/loss"))
    assert rows[("grit#2", "fit_seconds")]["value"] == pytest.approx(_last(recorded, "grit", "time/fit_s"))
    assert rows[("qlora#1", "trainable_params")]["value"] == TRAINABLE
    assert rows[("grit#2", "effective_params")]["value"] == EFFECTIVE_PARAMS
    assert rows[("grit#2", "effective_rank_mean")]["value"] == pytest.approx(8.0)
    step_s = [m[2] for m in next(e for e in recorded["experiments"] if e["method"] == "grit")["metrics"] if m[1] == "perf/step_s"]
    assert rows[("grit#2", "step_time_s")]["value"] == pytest.approx(float(np.median(step_s)))
    assert rows[("qlora#1", "peak_memory_gib")]["details"]["memory_kind"] == "process RSS"
    assert rows[("qlora", "mean_final_train_loss")]["details"]["n_runs"] == 1
    # 6 matched steps (one window), 3 validations, step time and tokens/s: 4 tests, Holm over the 4
    assert sorted(t["metric"] for t in tests) == ["step_time_s", "tokens_per_s", "train_loss", "val_loss"]
    assert all(t["group_a"] == "qlora#1" and t["group_b"] == "grit#2" and t["correction"] == "holm" for t in tests)
    assert all(t["p_adjusted"] >= t["p_value"] for t in tests)
    speed = next(t for t in tests if t["metric"] == "step_time_s")
    assert speed["p_value"] == pytest.approx(2 / 70)  # Mann-Whitney exact, 4 vs 4 steps, complete separation
    assert f"{speed['p_value']:.3g}" in md


def test_compare_twice_replaces_its_rows(run_db, tmp_path):
    def counts():
        with sqlite3.connect(run_db) as conn:
            return [conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("comparative_analysis", "statistical_tests")]

    compare(run_db, tmp_path / "a")
    first = counts()
    compare(run_db, tmp_path / "a")
    assert counts() == first and first[0] > 0
    assert first[1] == 4 + 4  # the AQI run's 4 tests and one set of training tests
    # a threshold no run reaches (smoothed losses stay above 4.2): no steps_to_threshold rows, reached = False
    compare(run_db, tmp_path / "b", loss_threshold=4.0)
    with ExperimentDB(run_db) as db:
        rows = db.rows("comparative_analysis", analysis=ANALYSIS)
    assert not [r for r in rows if r["metric"] == "steps_to_threshold"]
    marks = [r for r in rows if r["metric"] == "loss_threshold"]
    assert [r["value"] for r in marks] == [4.0, 4.0] and not any(r["details"]["reached"] for r in marks)


def test_compare_selected_experiments_and_errors(run_db, tmp_path):
    assert compare(run_db, tmp_path / "one", experiments=[2]) == 0
    md = (tmp_path / "one" / "comparison.md").read_text()
    assert "grit#2" in md and "qlora#1" not in md and "No test" in md
    with pytest.raises(ValueError, match="no experiment with id 99"):
        compare(run_db, tmp_path / "x", experiments=[99])
    with pytest.raises(ValueError, match="experiment 3 is a 'test' run"):
        compare(run_db, tmp_path / "x", experiments=[3])
    with pytest.raises(ValueError, match="loss_threshold"):
        compare(run_db, tmp_path / "x", loss_threshold=float("nan"))


def test_compare_missing_or_empty_database(tmp_path):
    missing = tmp_path / "nowhere" / "centralized.db"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compare(missing, tmp_path / "out")
    assert not missing.exists() and not missing.parent.exists()
    empty = tmp_path / "empty.db"
    ExperimentDB(empty).close()  # a valid database without any run
    with pytest.raises(ValueError, match="holds no training run"):
        compare(empty, tmp_path / "out")
    assert not (tmp_path / "out" / "comparison.md").exists()
