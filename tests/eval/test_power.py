"""Power and sample size: exact McNemar power against enumeration, Wald MDE arithmetic, planners."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from fteval.eval.power import mcnemar_mde, mcnemar_power, mde_wald, prompts_for_delta, prompts_for_refusal_change


def _brute_power(n, p10, p01, alpha=0.05):
    """Sum over every (n10, n01, rest) multinomial outcome of [scipy's exact binomial test rejects]."""
    total = 0.0
    for n10, n01 in itertools.product(range(n + 1), repeat=2):
        if n10 + n01 > n:
            continue
        prob = sps.multinomial.pmf([n10, n01, n - n10 - n01], n, [p10, p01, 1 - p10 - p01])
        d = n10 + n01
        if d and sps.binomtest(n10, d, 0.5).pvalue < alpha:
            total += prob
    return total


@pytest.mark.parametrize("n,p10,p01", [(12, 0.3, 0.05), (20, 0.2, 0.1), (15, 0.1, 0.1)])
def test_mcnemar_power_equals_enumeration(n, p10, p01):
    assert mcnemar_power(n, p10, p01) == pytest.approx(_brute_power(n, p10, p01), abs=1e-12)


def test_mcnemar_null_power_is_the_size_and_below_alpha():
    assert mcnemar_power(100, 0.1, 0.1) <= 0.05
    assert mcnemar_power(100, 0.0, 0.0) == 0.0


def test_mcnemar_mde_is_the_smallest_detectable_change():
    mde = mcnemar_mde(100, 0.2)
    q = max(0.2, mde)
    assert mcnemar_power(100, (q + mde) / 2, (q - mde) / 2) >= 0.8
    below = mde - 0.005
    qb = max(0.2, below)
    assert mcnemar_power(100, (qb + below) / 2, (qb - below) / 2) < 0.8
    assert mcnemar_mde(3, 0.2) is None  # 3 prompts: even a change of 100 points is p = 0.25


def test_wald_mde_and_prompts_for_delta():
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)  # 1.95996 + 0.84162 = 2.80158
    assert mde_wald(0.01) == pytest.approx(z * 0.01, rel=1e-12)
    # SE falls as 1/sqrt(n): at n' = n (MDE / Delta)^2 the MDE equals Delta
    n_new = prompts_for_delta(0.01, 100, 0.01)
    assert n_new == int(np.ceil(100 * z**2))
    assert mde_wald(0.01 * np.sqrt(100 / n_new)) <= 0.01
    with pytest.raises(ValueError, match="delta"):
        prompts_for_delta(0.01, 100, 0.0)


def test_prompts_for_refusal_change_reaches_power():
    n = prompts_for_refusal_change(0.1, 0.2)
    assert mcnemar_power(n, 0.15, 0.05) >= 0.8
    assert prompts_for_refusal_change(0.001, 0.5, max_n=200) is None
    with pytest.raises(ValueError, match="alpha and power"):
        mde_wald(0.1, alpha=1.5)
