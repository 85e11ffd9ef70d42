"""Bias-corrected separation: closed forms against brute force, unbiasedness, intervals, bad input."""

import math

import numpy as np
import pytest
import torch

from fteval.eval.metrics import cluster_scores
from fteval.eval.separation_paired import paired_from_fits, paired_separation_deltas
from fteval.eval.separation import (
    SCORES,
    derivative,
    fit_separation,
    heavy_tailed,
    scores_from_ratio,
    separation_intervals,
    tail_share,
)


def _data(n0=5, n1=7, dim=6, shift=2.0, seed=0, offset=30.0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * n0 + [1] * n1)
    x = torch.randn(n0 + n1, dim, generator=gen, dtype=torch.float64) + offset
    x[:, 0] += shift * y
    return x, y


def _brute_ratio(x, y, shares):
    """U / s2 from its definition, for prompts x [n, D] with labels y (the shares are the design's)."""
    stats = []
    for k in (0, 1):
        xk = x[y == k]
        c = xk.mean(0)
        stats.append((c, float(((xk - c) ** 2).sum()) / (xk.shape[0] - 1), xk.shape[0]))
    (c0, t0, n0), (c1, t1, n1) = stats
    u = float(((c0 - c1) ** 2).sum()) - t0 / n0 - t1 / n1
    return u / (shares[0] * t0 + shares[1] * t1)


def test_leave_one_out_closed_form_equals_refitting():
    x, y = _data()
    fit = fit_separation(x, y)
    shares = (5 / 12, 7 / 12)
    assert fit.ratio == pytest.approx(_brute_ratio(x, y, shares), rel=1e-12)
    for i in range(12):
        keep = torch.arange(12) != i
        # the offset of 30 costs ~1e-12 relative accuracy in the refitted sums; the closed form is centred
        assert fit.ratio_loo[i] == pytest.approx(_brute_ratio(x[keep], y[keep], shares), rel=1e-9)


def test_plug_in_ratio_reproduces_every_raw_score():
    """scores_from_ratio of N d2 / W is the plug-in XBI, CHI, AQI, bounded AQI: one set of formulas."""
    x, y = _data(n0=9, n1=4, dim=5, seed=3)
    fit = fit_separation(x, y)
    raw = cluster_scores(x, y, with_db_dunn=False)
    mapped = scores_from_ratio(fit.raw_ratio, 13, fit.shares)
    for key in SCORES:
        assert mapped[key] == pytest.approx(float(raw[key]), rel=1e-10), key


def test_derivatives_match_finite_differences():
    for key in SCORES:
        r, h = 0.3, 1e-6
        numeric = (scores_from_ratio(r + h, 200, (0.4, 0.6))[key] - scores_from_ratio(r - h, 200, (0.4, 0.6))[key]) / (2 * h)
        assert derivative(key, r, 200, (0.4, 0.6)) == pytest.approx(numeric, rel=1e-6), key


def test_bias_correction_removes_the_noise_floor(one_thread):
    """Mean over 400 draws: the corrected ratio sits on delta^2 / sigma^2 = 0.25; the plug-in N d2 / W on
    (0.25 + tr(S)(1/n0 + 1/n1) / sigma^2) N / (N - 2) = 0.35 x 40 / 38 = 0.368 (W / N estimates
    (N - 2) / N sigma^2). Their SD over draws is ~0.06, so each mean's SE is ~0.003; tolerance 0.015."""
    gen = torch.Generator().manual_seed(1)
    n, dim, delta2 = 20, 40, 0.25 * 40  # sigma^2 = tr(S) = dim
    y = torch.arange(2 * n) >= n
    bc, raw = [], []
    for _ in range(400):
        x = torch.randn(2 * n, dim, generator=gen, dtype=torch.float64)
        x[:, 0] += math.sqrt(delta2) * y
        fit = fit_separation(x, y.long())
        bc.append(fit.ratio)
        raw.append(fit.raw_ratio)
    assert np.mean(bc) == pytest.approx(0.25, abs=0.015)
    assert np.mean(raw) == pytest.approx(0.35 * 40 / 38, abs=0.015)


def test_intervals_bracket_estimates_and_map_monotonically():
    x, y = _data(n0=30, n1=30, dim=8, shift=3.0, seed=2)
    res = separation_intervals(x, y)
    for key in SCORES:
        lo, hi = res["ci"][key]
        assert lo <= res["estimate"][key] <= hi, key
    # xbi = 1 / ratio: its interval is the reciprocal of inv_xbi's, reversed
    assert res["ci"]["xbi"][0] == pytest.approx(1 / res["ci"]["inv_xbi"][1])
    assert res["ci"]["xbi"][1] == pytest.approx(1 / res["ci"]["inv_xbi"][0])
    assert res["heavy_tailed"] is False


def test_no_separation_gives_open_xbi_interval_and_zero_estimates():
    x, y = _data(n0=10, n1=10, dim=50, shift=0.0, seed=4)
    res = separation_intervals(x, y)
    assert res["ratio"] - 2.1 * res["ratio_se"] < 0  # nothing above the noise floor
    assert res["ci"]["xbi"][1] is None and res["ci"]["aqi_bounded"][0] == 0.0
    if res["ratio"] <= 0:
        assert res["estimate"]["aqi_bounded"] == 0.0 and math.isinf(res["estimate"]["xbi"])


def test_paired_identical_models_give_zero_width_and_p_one():
    x, y = _data(n0=8, n1=8)
    res = paired_separation_deltas(x, x.clone(), y)
    for key in ("aqi", "aqi_bounded", "xbi", "chi"):
        assert res[key]["delta_bc"] == 0.0 and res[key]["ci"] == [0.0, 0.0] and res[key]["p_value"] == 1.0


def test_paired_delta_sign_and_scale_invariance():
    x, y = _data(n0=40, n1=40, dim=6, shift=1.0, seed=5)
    better = x.clone()
    better[:, 0] += 1.0 * y
    res = paired_separation_deltas(better, x, y)
    assert res["aqi_bounded"]["delta_bc"] > 0 and res["xbi"]["delta_bc"] < 0
    assert res["aqi_bounded"]["p_value"] < 0.01
    # XBI's test is the test of 1/XBI (same null hypothesis), whose Wald statistic is CHI's (both linear in the ratio)
    assert res["xbi"]["p_value"] == pytest.approx(res["chi"]["p_value"], rel=1e-9)
    lo, hi = res["xbi"]["ci"]
    assert (lo is None or lo < res["xbi"]["delta_bc"]) and res["xbi"]["delta_bc"] < hi
    scaled = paired_separation_deltas(better * 3.0 + 1.0, x, y)  # every score is scale and shift free
    for key in ("aqi", "aqi_bounded", "chi"):
        assert scaled[key]["delta_bc"] == pytest.approx(res[key]["delta_bc"], rel=1e-9)
        assert scaled[key]["se"] == pytest.approx(res[key]["se"], rel=1e-5)  # float32 Gram term


def test_bad_input_is_refused():
    x, y = _data()
    with pytest.raises(ValueError, match="two classes"):
        fit_separation(torch.cat([x, x[:3]]), torch.cat([y, torch.tensor([2, 2, 2])]))
    with pytest.raises(ValueError, match="at least 3 prompts per class"):
        fit_separation(x[:7], torch.tensor([0, 0, 1, 1, 1, 1, 1]))
    with pytest.raises(ValueError, match="same prompts"):
        paired_separation_deltas(x, x[:-1], y)
    with pytest.raises(ValueError, match="confidence"):
        separation_intervals(x, y, confidence=95)


def _xbi_test_statistic(fa, fb, c, moments, tq):
    """|g_c| / (t SE) of the test the Delta-XBI interval inverts (1 on the interval's ends)."""
    from fteval.eval.separation import _standard_error

    g = fb.ratio - fa.ratio - c * fa.ratio * fb.ratio
    loo = fb.ratio_loo - fa.ratio_loo - c * fa.ratio_loo * fb.ratio_loo
    weights = ((-1.0 - c * fb.ratio) / fa.s2, (1.0 - c * fa.ratio) / fb.s2)
    return abs(g) / (tq * _standard_error(loo, fa.inverse, weights, moments))


def test_xbi_interval_inverts_the_test_whose_p_value_it_prints():
    """Delta XBI: its interval is every value the printed test keeps (Fieller), its ends are where that test
    sits exactly at its critical value, the point is inside, and 0 is outside exactly when p < 0.05."""
    from fteval.eval.separation import _second_order_moments, _t_quantile

    for shift, seed in ((1.5, 1), (0.6, 2), (0.0, 3)):
        x, y = _data(n0=60, n1=60, dim=8, shift=2.0, seed=seed)
        other = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        other[:, 1] += shift * y
        fa, fb = fit_separation(other, y), fit_separation(x, y)
        res = paired_from_fits(fa, fb)["xbi"]
        tq, moments = _t_quantile(0.95, 120), _second_order_moments([fa, fb])
        lo, hi = res["ci"]
        assert lo < res["delta_bc"] < hi
        assert res["delta_bc"] == pytest.approx(1 / fa.ratio - 1 / fb.ratio, rel=1e-12)
        for end in (lo, hi):
            assert _xbi_test_statistic(fa, fb, end, moments, tq) == pytest.approx(1.0, abs=1e-6)
        assert (lo > 0 or hi < 0) == (res["p_value"] < 0.05)


def test_tail_share_separates_light_from_heavy_tails():
    """The farthest 5% of Gaussian prompts carry ~9% of the scatter; a sub-cluster or a t3 tail far more;
    the warning fires on either diagnostic."""
    rng = np.random.default_rng(0)
    assert tail_share(np.arange(1.0, 21.0)) == pytest.approx(20 / 210)  # one of 20 values: the largest
    light = tail_share((rng.standard_normal((2000, 64)) ** 2).sum(axis=1))
    assert 0.05 < light < 0.08  # chi-square with 64 degrees of freedom: a light tail
    q = np.ones(1000)
    q[:30] = 33.0  # 3% of the prompts carry half the scatter
    assert tail_share(q) == pytest.approx((30 * 33 + 20) / (30 * 33 + 970))
    assert tail_share(np.zeros(4)) == 0.0 and tail_share(np.array([])) == 0.0
    assert heavy_tailed(0.5, 0.15) is False and heavy_tailed(11.0, 0.1) is True and heavy_tailed(0.5, 0.1, 0.21) is True
