"""The calibration suite's fast subset: every printed interval covers and every test keeps its level.

Fast settings (Gaussian and outlier-cluster embeddings, 100 prompts per class, hidden size 576,
200 replications each through ``summarise``: ~30 s each with one thread). A rate's binomial SE at
200 replications is ~0.015 near 0.95 and ~0.015 near 0.05: the floors (coverage >= 0.90, null
rejection <= 0.09) sit 2-4 SE from the rates docs/statistics.md measures, so the test fails on a
real loss of calibration, not on noise. The full table: ``python -m fteval bench stats``.
"""

import json

import numpy as np
import pytest

from fteval.__main__ import main
from fteval.eval.calibration import Setting, binary_rows, merge_runs, run_setting, setting_rows

FAST = [Setting("gaussian", 100, 576), Setting("outlier", 100, 576)]


@pytest.mark.parametrize("setting", FAST, ids=lambda s: s.label)
def test_fast_settings_cover_and_keep_the_level(setting, one_thread):
    res = run_setting(setting, reps=200, seed=11)
    rows = setting_rows(setting, res)
    coverage = [r for r in rows if r["kind"] == "coverage"]
    rejection = [r for r in rows if r["kind"] == "rejection"]
    # 4 single-model and 4 paired intervals; 5 tests (4 Deltas and the silhouette's) and Holm's family-wise error
    assert len(coverage) == 8 and len(rejection) == 6
    for r in coverage:
        assert r["n"] >= 190 and r["rate"] >= 0.90, r  # xbi's paired interval needs separations above the floor
    for r in rejection:
        assert r["rate"] <= 0.09, r
    assert {r["quantity"]: r["rate"] for r in rows}["points outside their interval"] == 0.0
    power = next(r for r in rows if r["quantity"] == "power Delta aqi_bounded")
    assert power["rate"] >= 0.9  # ratio 0.2 -> 0.3 at 100 prompts per class is detectable


def test_heavy_tails_are_flagged_where_intervals_miss(one_thread):
    """Multivariate t (3 df) and a 3% sub-cluster: the warning shows in nearly every replication and on the
    missed intervals; never for Gaussians."""
    heavy = merge_runs([run_setting(Setting("t3", 100, 576), reps=30, seed=3),
                        run_setting(Setting("subcluster", 100, 576), reps=30, seed=3)])
    gauss = run_setting(Setting("gaussian", 100, 576), reps=30, seed=3)
    assert heavy["heavy_flagged"] >= 57 and gauss["heavy_flagged"] == 0
    assert heavy["single_miss_flagged"] == heavy["single_miss"] and heavy["paired_miss_flagged"] == heavy["paired_miss"]
    assert np.median(heavy["kurtosis"]) > 10.0 > 2.0 > np.median(gauss["kurtosis"])


def test_merge_runs_adds_counts():
    a = {"single": {"aqi": 2}, "kurtosis": [1.0], "reps": 3, "seconds": 1.0}
    b = {"single": {"aqi": 1}, "kurtosis": [2.0, 3.0], "reps": 2, "seconds": 0.5}
    assert merge_runs([a, b]) == {"single": {"aqi": 3}, "kurtosis": [1.0, 2.0, 3.0], "reps": 5, "seconds": 1.5}


def test_binary_rows_are_exact():
    rows = {(r["setting"], r["kind"]): r["rate"] for r in binary_rows(n_values=(20,))}
    # the size by brute force: every discordant count d and split k under H0, scipy's own test
    from scipy import stats as sps

    size = max(sum(sps.binom.pmf(d, 20, q) * sum(sps.binom.pmf(k, d, 0.5) for k in range(d + 1)
                                                 if sps.binomtest(k, d, 0.5).pvalue < 0.05) for d in range(1, 21))
               for q in (0.05, 0.1, 0.2, 0.4))
    assert rows[("binary n=20", "rejection")] == pytest.approx(size, rel=1e-9)
    # The exact McNemar test never exceeds its level; the exact (Clopper-Pearson) interval never covers less than 0.95.
    assert 0.0 < rows[("binary n=20", "rejection")] <= 0.05
    assert 0.95 <= rows[("binary n=20", "coverage")] < 1.0


def test_setting_checks():
    with pytest.raises(ValueError, match="distribution"):
        Setting("cauchy", 100, 576)
    with pytest.raises(ValueError, match="reps"):
        run_setting(Setting("gaussian", 10, 16), reps=0)


def test_bench_stats_prints_table_and_verdict(tmp_path, capsys, one_thread):
    out = tmp_path / "rows.json"
    main(["bench", "stats", "--reps", "30", "--distributions", "[gaussian]", "--n_per_class", "[100]",
          "--dims", "[576]", "--output", str(out)])
    text = capsys.readouterr().out
    assert "gaussian n=100 D=576" in text and "PASS: no printed point lies outside" in text
    assert "CI Delta aqi_bounded" in text and "exact McNemar size" in text and "null rejection Delta silhouette" in text
    assert "30 replications per setting, seed 0" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["quantity"] for r in rows} >= {"CI aqi", "null rejection Delta aqi_bounded", "power Delta aqi_bounded",
                                            "family-wise error after Holm", "missed CIs warned (Delta)"}


def test_bench_stats_refuses_bad_workers(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "stats", "--reps", "2", "--workers", "0"])
    assert exit_.value.code == 2 and "--workers must be >= 1" in capsys.readouterr().err


def test_verdicts_fail_on_over_coverage_outside_points_and_silent_warnings():
    from fteval.bench.stats import _tasks, setting_verdicts

    def row(quantity, kind, k, n):
        from fteval.eval.calibration import wilson

        lo, hi = wilson(k, n)
        return {"quantity": quantity, "kind": kind, "rate": k / n, "low": lo, "high": hi, "n": n}

    good = [row("CI aqi", "coverage", 475, 500), row("null rejection Delta aqi", "rejection", 25, 500),
            row("missed CIs warned (single)", "sensitivity", 20, 25), row("missed CIs warned (Delta)", "sensitivity", 1, 1),
            {"quantity": "points outside their interval", "kind": "count", "rate": 0.0, "low": None, "high": None, "n": 500}]
    assert setting_verdicts(Setting("gaussian", 100, 576), good) == []
    wide = [row("CI Delta aqi", "coverage", 500, 500)] + good[1:]
    assert "over-covers" in setting_verdicts(Setting("gaussian", 100, 576), wide)[0]
    liberal = good[:1] + [row("null rejection Delta aqi", "rejection", 45, 500)] + good[2:]
    assert "Wilson low" in setting_verdicts(Setting("gaussian", 100, 576), liberal)[0]
    # heavy tails: a liberal test passes only when the warning marked >= 80% of its false rejections
    warned = liberal + [row("false rejections warned", "sensitivity", 40, 45)]
    assert setting_verdicts(Setting("t3", 100, 576), warned) == []
    silent_test = liberal + [row("false rejections warned", "sensitivity", 20, 45)]
    assert "marks only 0.44 of the false rejections" in setting_verdicts(Setting("t3", 100, 576), silent_test)[0]
    outside = good[:4] + [dict(good[4], rate=2.0)]
    assert "2 points outside their interval" in setting_verdicts(Setting("gaussian", 100, 576), outside)[0]
    # heavy tails: coverage below 0.90 passes only when the warning marks >= 80% of the misses
    missed = [row("CI aqi", "coverage", 425, 500)] + good[1:]
    assert setting_verdicts(Setting("t3", 100, 576), missed) == []
    silent = [missed[0], missed[1], row("missed CIs warned (single)", "sensitivity", 30, 75)] + missed[3:]
    assert "warning marks only 0.40" in setting_verdicts(Setting("t3", 100, 576), silent)[0]
    assert "coverage 0.850 < 0.93" in setting_verdicts(Setting("gaussian", 100, 576), missed)[0]
    # parallel tasks: every replication once, in chunks with their own seeds, largest settings first
    settings = [Setting("gaussian", 100, 576), Setting("gaussian", 500, 4096)]
    tasks = _tasks(settings, 60, 0, 0.95, workers=4)
    assert sorted(t[2] for t in tasks if t[0] == 0) == [10, 25, 25] and tasks[0][0] == 1
    assert len({t[3] for t in tasks}) == len(tasks)
    assert _tasks(settings, 60, 7, 0.95, workers=1) == [(0, settings[0], 60, 7, 0.95, "jackknife"),
                                                         (1, settings[1], 60, 8, 0.95, "jackknife")]
    both = _tasks(settings[:1], 30, 0, 0.95, workers=2, methods=("jackknife", "bootstrap"))
    assert [(t[0], t[2], t[3], t[5]) for t in both] == [(0, 25, 1000, "jackknife"), (0, 5, 2000, "jackknife"),
                                                         (1, 25, 1000, "bootstrap"), (1, 5, 2000, "bootstrap")]


def test_bench_stats_plan_reads_a_results_file(tmp_path, capsys):
    results = {"comparisons": {"grit vs qlora": {"a": "grit", "b": "qlora", "n_per_class": 100,
                                                 "aqi_bounded": {"se": 0.01}}}}
    path = tmp_path / "aqi_results.json"
    path.write_text(json.dumps(results))
    main(["bench", "stats", "--plan", str(path), "--deltas", "[0.02]", "--refusal_deltas", "[0.1]"])
    text = capsys.readouterr().out
    # MDE = 2.8016 x 0.01; prompts for 0.02: 100 x (0.028016 / 0.02)^2 = 196.2 -> 197
    assert "grit vs qlora" in text and "0.0280" in text and "197" in text
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "stats", "--plan", str(tmp_path / "missing.json")])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err
