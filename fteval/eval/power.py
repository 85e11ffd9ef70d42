"""Power and sample size of ``fteval test``'s comparisons: the smallest detectable change, prompts needed.

* **Delta bounded AQI** (paired, jackknife Wald test, :mod:`fteval.eval.separation`): at two-sided
  level alpha and power 1 - beta the smallest detectable |Delta| is (z_{1-alpha/2} + z_{1-beta}) SE
  (about 2.80 SE at 0.05 / 80%). The jackknife SE of a smooth statistic falls as 1/sqrt(n), so
  with n' prompts per class SE' = SE sqrt(n / n'), and detecting Delta needs
  n' = n (MDE / Delta)^2 prompts per class.
* **Refusal-rate change** (exact McNemar test, :func:`fteval.eval.stats.mcnemar_exact`): power is
  computed exactly, summing over the number of discordant prompts d ~ Binomial(n, q) the
  probability that the binomial test on the split rejects. A change Delta = p10 - p01 with a
  discordant share q = p10 + p01 >= Delta; the summary uses the pair's observed discordant share
  (at least Delta), the planner a share given by the user.

Hand-written: scipy has no power functions (statsmodels, which has normal-approximation ones, is
not a dependency).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import stats as sps

__all__ = ["mcnemar_mde", "mcnemar_power", "mde_wald", "prompts_for_delta", "prompts_for_refusal_change"]


def _z(alpha: float, power: float) -> float:
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}.")
    return float(sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power))


def mde_wald(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |Delta| a two-sided Wald test with standard error ``se`` detects with probability ``power``."""
    return _z(alpha, power) * float(se)


def prompts_for_delta(se: float, n_per_class: int, delta: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Prompts per class for which |``delta``| is detectable, given ``se`` measured at ``n_per_class``."""
    if delta <= 0:
        raise ValueError(f"delta must be > 0, got {delta}.")
    return max(3, math.ceil(n_per_class * (mde_wald(se, alpha, power) / delta) ** 2))


def _critical_counts(n: int, alpha: float) -> np.ndarray:
    """c_d for d = 0..n: the exact two-sided binomial test (p = 1/2) rejects when min(k, d - k) <= c_d (-1: never).

    For p = 1/2, ``scipy.stats.binomtest``'s two-sided p-value is min(1, 2 F(min(k, d - k))), F the
    Binomial(d, 1/2) cdf, so the region is the largest c with 2 F(c) < alpha.
    """
    d = np.arange(n + 1)
    # ppf(alpha/2) = the smallest c with F(c) >= alpha/2, so c_d = ppf - 1 (-1 where nothing rejects)
    crit = sps.binom.ppf(alpha / 2.0, d, 0.5).astype(np.int64) - 1
    crit[0] = -1
    return crit


def mcnemar_power(n: int, p10: float, p01: float, alpha: float = 0.05) -> float:
    """Exact power of the exact McNemar test with n pairs, P(only a) = p10, P(only b) = p01."""
    if n < 1 or p10 < 0 or p01 < 0 or p10 + p01 > 1:
        raise ValueError(f"need n >= 1 and p10, p01 >= 0 with p10 + p01 <= 1, got n={n}, {p10}, {p01}.")
    q = p10 + p01
    if q == 0:
        return 0.0
    share = p10 / q
    crit = _critical_counts(n, alpha)
    d = np.arange(n + 1)
    reject = np.where(crit >= 0, sps.binom.cdf(crit, d, share) + sps.binom.sf(d - crit - 1, d, share), 0.0)
    return float(np.clip(sps.binom.pmf(d, n, q) @ reject, 0.0, 1.0))


def mcnemar_mde(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8, step: float = 0.005) -> Optional[float]:
    """Smallest rate change Delta (grid ``step``) the exact McNemar test detects with ``power`` on n prompts.

    The discordant share is max(``discordance``, Delta) (a change of Delta needs at least Delta
    discordant prompts), split p10 = (q + Delta) / 2, p01 = (q - Delta) / 2. ``None`` if no change
    up to 1 is detectable (too few prompts).
    """
    for delta in np.arange(step, 1.0 + step / 2, step):
        q = min(1.0, max(discordance, delta))
        if mcnemar_power(n, (q + delta) / 2.0, (q - delta) / 2.0, alpha) >= power:
            return float(round(delta, 10))
    return None


def prompts_for_refusal_change(delta: float, discordance: float, alpha: float = 0.05, power: float = 0.8,
                               max_n: int = 20000) -> Optional[int]:
    """Prompts (of the category: unsafe for refusal, safe for over-refusal) to detect a rate change ``delta``.

    Power is not monotone in n for exact tests (it saw-tooths); this returns the smallest n from
    which a doubling search and a bisection find power >= ``power``. ``None`` above ``max_n``.
    """
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}.")
    q = min(1.0, max(discordance, delta))
    p10, p01 = (q + delta) / 2.0, (q - delta) / 2.0
    lo, hi = 1, 8
    while mcnemar_power(hi, p10, p01, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > max_n:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mcnemar_power(mid, p10, p01, alpha) >= power else (mid, hi)
    return hi
