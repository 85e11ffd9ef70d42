"""The calibration suite's fast subset: every printed interval covers and every test keeps its level.

Fast settings (Gaussian and outlier-cluster embeddings, 100 prompts per class, hidden size 576,
200 replications each: ~10 s with one thread). A rate's binomial SE at 200 replications is
~0.015 near 0.95 and ~0.015 near 0.05: the floors (coverage >= 0.90, null rejection <= 0.08) sit
2-4 SE from the rates docs/statistics.md measures (0.94-0.99 and 0.01-0.05), so the test fails
on a real loss of calibration, not on noise. The full table: ``python -m fteval bench stats``.
"""

import json

import pytest

from fteval.__main__ import main
from fteval.eval.calibration import Setting, binary_rows, run_setting, setting_rows

FAST = [Setting("gaussian", 100, 576), Setting("outlier", 100, 576)]


@pytest.mark.parametrize("setting", FAST, ids=lambda s: s.label)
def test_fast_settings_cover_and_keep_the_level(setting, one_thread):
    res = run_setting(setting, reps=200, seed=11)
    rows = setting_rows(setting, res)
    coverage = [r for r in rows if r["kind"] == "coverage"]
    rejection = [r for r in rows if r["kind"] == "rejection"]
    assert len(coverage) == 8 and len(rejection) == 4  # 4 single-model and 4 paired intervals, 4 tests
    for r in coverage:
        assert r["n"] >= 190 and r["rate"] >= 0.90, r  # xbi's paired interval needs separations above the floor
    for r in rejection:
        assert r["rate"] <= 0.08, r
    power = next(r for r in rows if r["kind"] == "power")
    assert power["rate"] >= 0.9  # ratio 0.2 -> 0.3 at 100 prompts per class is detectable


def test_heavy_tails_are_flagged(one_thread):
    """Multivariate t (3 df): the summary's heavy-tail warning fires in most replications, never for Gaussians."""
    heavy = run_setting(Setting("t3", 100, 576), reps=40, seed=3)
    gauss = run_setting(Setting("gaussian", 100, 576), reps=40, seed=3)
    assert heavy["heavy_flagged"] >= 30 and gauss["heavy_flagged"] == 0
    assert heavy["kurtosis"] > 10.0 > 2.0 > gauss["kurtosis"]


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
    assert "gaussian n=100 D=576" in text and "PASS: every Gaussian interval" in text and "CI Delta aqi_bounded" in text and "exact McNemar size" in text
    assert "30 replications per setting, seed 0" in text
    rows = json.loads(out.read_text())["rows"]
    assert {r["quantity"] for r in rows} >= {"CI aqi", "null rejection Delta aqi_bounded", "power Delta aqi_bounded"}


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
