"""Monte Carlo calibration of the intervals and tests that ``fteval test`` prints, against a known truth.

Each setting draws, ``reps`` times, the pooled embeddings of N = 2 n prompts (n per class) by two
models of hidden size D with a known population separation, and runs the evaluator's own
functions (:func:`fteval.eval.separation.fit_separation`, :func:`intervals_from_fit`,
:func:`paired_from_fits`) on them:

* **single**: model A's intervals of aqi, aqi_bounded, xbi and chi against their population
  values at the run's N (:func:`fteval.eval.separation.scores_from_ratio` of the true ratio);
* **paired, alternative**: model B separates more (ratio ``ratio_b``); coverage of the paired
  Delta intervals of the same four scores, and the rejection rate (power) at alpha 0.05;
* **paired, null**: model B has model A's population (its noise correlated with A's, as two
  models' hidden states of the same prompts are); rejection rate at alpha 0.05 (should be <= 0.05).

Embeddings are drawn cheaply from a low-rank-plus-diagonal covariance with an LLM-like decaying
spectrum, x = m_k + sqrt(diag) * z + F w (diag_j proportional to 1/j over the hidden size,
``RANK`` dominant directions in F holding 40% of the variance, a common offset as hidden
states have), in three families:

* ``gaussian``: z, w standard normal;
* ``t3``: the same vector times sqrt(3 / chi2_3) per prompt (multivariate t, 3 degrees of freedom:
  covariance 3x the Gaussian's, heavy tails);
* ``outlier``: Gaussian plus, for 5% of the prompts of either class, a fixed offset of squared norm
  4 tr(S) (an outlier cluster; the class means move equally, the covariance grows by
  p (1 - p) ||offset||^2).

Model B's noise is ``CORRELATION`` x A's plus sqrt(1 - CORRELATION^2) x an independent draw of the
same family, so B's covariance equals A's and the pair is correlated per prompt. The truth is the
ratio delta^2 / tr(S) of the class-mean distance and the covariance trace, in closed form.

Every proportion comes with a Wilson 95% interval (``scipy.stats.binomtest``). The behaviour
statistics are calibrated exactly (no simulation): the exact interval of a refusal rate
(coverage summed over the binomial distribution) and the exact McNemar test's size (summed over
the discordant counts), see :func:`binary_rows`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from scipy import stats as sps

from fteval.eval.metrics import DEFAULT_LAMBDA
from fteval.eval.separation import fit_separation, intervals_from_fit, paired_from_fits, scores_from_ratio

__all__ = ["DISTRIBUTIONS", "Setting", "binary_rows", "default_settings", "run_setting", "wilson"]

DISTRIBUTIONS = ("gaussian", "t3", "outlier")
METRICS = ("aqi", "aqi_bounded", "xbi", "chi")  # the scores the summary prints with intervals
RANK = 8  # dominant directions of the covariance (F has RANK columns)
CORRELATION = 0.7  # per-prompt correlation of model B's noise with model A's
OUTLIER_SHARE, OUTLIER_SCALE = 0.05, 4.0  # share of outlier prompts; ||offset||^2 / tr(S_gaussian)
ALPHA = 0.05


@dataclass(frozen=True)
class Setting:
    """One simulated design: distribution family, prompts per class, hidden size, true ratios of A and B."""

    distribution: str
    n_per_class: int
    dim: int
    ratio_a: float = 0.2
    ratio_b: float = 0.3

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {list(DISTRIBUTIONS)}, got {self.distribution!r}.")
        if self.n_per_class < 3:
            raise ValueError(f"n_per_class must be >= 3, got {self.n_per_class}.")
        if self.dim < RANK + 1:
            raise ValueError(f"dim must be > {RANK}, got {self.dim}.")
        if not (self.ratio_a > 0 and self.ratio_b > 0):
            raise ValueError(f"ratios must be > 0, got {self.ratio_a} and {self.ratio_b}.")

    @property
    def label(self) -> str:
        """'gaussian n=100 D=576'."""
        return f"{self.distribution} n={self.n_per_class} D={self.dim}"


def default_settings(distributions: Iterable[str] = DISTRIBUTIONS, n_per_class: Iterable[int] = (100, 500),
                     dims: Iterable[int] = (576, 4096)) -> list[Setting]:
    """The grid of the docs' table: every distribution x prompts per class x hidden size."""
    return [Setting(d, n, k) for d in distributions for n in n_per_class for k in dims]


class _Sampler:
    """Draws noise ``[N, D]`` float64 of one family with a fixed covariance; ``trace`` = tr(S) of that noise."""

    def __init__(self, distribution: str, dim: int, gen: torch.Generator) -> None:
        self.distribution, self.dim, self.gen = distribution, dim, gen
        diag = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)  # LLM-like decaying spectrum
        self.sqrt_diag = (0.6 * dim * diag / diag.sum()).sqrt()  # diagonal part holds 60% of tr = dim
        weights = 1.0 / torch.arange(1, RANK + 1, dtype=torch.float64)
        basis, _ = torch.linalg.qr(torch.randn(dim, RANK, generator=gen, dtype=torch.float64))
        self.factor = basis * (0.4 * dim * weights / weights.sum()).sqrt()  # [D, RANK], 40% of tr
        base_trace = float(dim)
        self.offset = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.offset *= math.sqrt(OUTLIER_SCALE * base_trace) / self.offset.norm()
        if distribution == "t3":
            self.trace = 3.0 * base_trace  # cov of t_3 = 3 / (3 - 2) x the scale matrix
        elif distribution == "outlier":
            self.trace = base_trace + OUTLIER_SHARE * (1 - OUTLIER_SHARE) * OUTLIER_SCALE * base_trace
        else:
            self.trace = base_trace

    def draw(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=self.gen, dtype=torch.float64) * self.sqrt_diag
        z += torch.randn(n, RANK, generator=self.gen, dtype=torch.float64) @ self.factor.T
        if self.distribution == "t3":
            g = torch.randn(n, 3, generator=self.gen, dtype=torch.float64).pow(2).sum(dim=1)  # chi2_3
            z *= (3.0 / g).sqrt()[:, None]
        elif self.distribution == "outlier":
            hit = torch.rand(n, generator=self.gen) < OUTLIER_SHARE
            z[hit] += self.offset
        return z


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of k successes in n (``scipy.stats.binomtest``)."""
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def run_setting(setting: Setting, reps: int, seed: int = 0, confidence: float = 0.95, lam: float = DEFAULT_LAMBDA,
                progress: Optional[Callable[[], None]] = None) -> dict:
    """Simulate one setting ``reps`` times; returns counts and rates (see the module docstring).

    Keys: ``single`` / ``paired_alt`` -> {metric: covered count}, ``null_reject`` / ``alt_reject``
    -> {metric: rejections at alpha 0.05}, ``defined`` -> {metric: replications with an interval}
    (xbi's paired interval needs both separations above the noise floor), ``kurtosis`` (median
    excess kurtosis of model A's pseudo-values), ``heavy_flagged`` (replications the summary flags),
    ``seconds``.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}.")
    gen = torch.Generator().manual_seed(int(seed))
    sampler = _Sampler(setting.distribution, setting.dim, gen)
    n, dim = setting.n_per_class, setting.dim
    labels = torch.arange(2 * n) >= n  # first n safe, then n unsafe
    labels = labels.long()
    shares = (0.5, 0.5)
    u = torch.randn(dim, generator=gen, dtype=torch.float64)
    u /= u.norm()
    common = 10.0 * torch.randn(dim, generator=gen, dtype=torch.float64)  # common offset of hidden states
    lab = labels[:, None].double()

    def shift(ratio: float) -> torch.Tensor:  # class means: common, common + delta u with delta^2 = ratio tr(S)
        return common + lab * (math.sqrt(ratio * sampler.trace) * u)

    mean_a, mean_b = shift(setting.ratio_a), shift(setting.ratio_b)
    big_n = 2 * n
    truth_a = scores_from_ratio(setting.ratio_a, big_n, shares, lam)
    truth_b = scores_from_ratio(setting.ratio_b, big_n, shares, lam)
    keep = math.sqrt(1.0 - CORRELATION**2)
    out = {"single": dict.fromkeys(METRICS, 0), "paired_alt": dict.fromkeys(METRICS, 0),
           "null_reject": dict.fromkeys(METRICS, 0), "alt_reject": dict.fromkeys(METRICS, 0),
           "null_cover": dict.fromkeys(METRICS, 0), "defined_alt": dict.fromkeys(METRICS, 0),
           "defined_null": dict.fromkeys(METRICS, 0), "kurtosis": [], "heavy_flagged": 0}
    start = time.perf_counter()
    for _ in range(reps):
        noise_a, fresh = sampler.draw(big_n), sampler.draw(big_n)
        noise_b = CORRELATION * noise_a + keep * fresh
        fit_a = fit_separation(mean_a + noise_a, labels)
        fit_alt = fit_separation(mean_b + noise_b, labels)
        fit_null = fit_separation(mean_a + noise_b, labels)
        single = intervals_from_fit(fit_a, confidence, lam)
        out["kurtosis"].append(single["excess_kurtosis"])
        out["heavy_flagged"] += single["heavy_tailed"]
        for m in METRICS:
            lo, hi = single["ci"][m]
            lo = -math.inf if lo is None else lo
            hi = math.inf if hi is None else hi
            out["single"][m] += lo <= truth_a[m] <= hi
        alt = paired_from_fits(fit_alt, fit_a, confidence, lam, METRICS)
        null = paired_from_fits(fit_null, fit_a, confidence, lam, METRICS)
        for m in METRICS:
            if alt[m]["ci"] is not None:
                out["defined_alt"][m] += 1
                lo, hi = alt[m]["ci"]
                out["paired_alt"][m] += lo <= truth_b[m] - truth_a[m] <= hi
                out["alt_reject"][m] += alt[m]["p_value"] < ALPHA
            if null[m]["ci"] is not None:
                out["defined_null"][m] += 1
                lo, hi = null[m]["ci"]
                out["null_cover"][m] += lo <= 0.0 <= hi
                out["null_reject"][m] += null[m]["p_value"] < ALPHA
        if progress is not None:
            progress()
    out["kurtosis"] = float(np.median(out["kurtosis"]))
    out["reps"] = reps
    out["seconds"] = time.perf_counter() - start
    return out


def setting_rows(setting: Setting, res: dict) -> list[dict]:
    """Table rows of one setting: quantity, target ('>= 0.95' coverage or '<= 0.05' rejection), rate, Wilson CI."""
    rows = []

    def add(quantity: str, kind: str, k: int, n: int) -> None:
        if n == 0:
            rows.append({"setting": setting.label, "quantity": quantity, "kind": kind, "rate": None, "low": None,
                         "high": None, "n": 0})
            return
        lo, hi = wilson(k, n)
        rows.append({"setting": setting.label, "quantity": quantity, "kind": kind, "rate": k / n, "low": lo,
                     "high": hi, "n": n})

    for m in METRICS:
        add(f"CI {m}", "coverage", res["single"][m], res["reps"])
    for m in METRICS:
        add(f"CI Delta {m}", "coverage", res["paired_alt"][m], res["defined_alt"][m])
    for m in METRICS:
        add(f"null rejection Delta {m}", "rejection", res["null_reject"][m], res["defined_null"][m])
    add("power Delta aqi_bounded", "power", res["alt_reject"]["aqi_bounded"], res["defined_alt"]["aqi_bounded"])
    add("heavy-tail warning shown", "flag", res["heavy_flagged"], res["reps"])
    return rows


def binary_rows(n_values: Iterable[int] = (10, 50, 100, 500), confidence: float = 0.95) -> list[dict]:
    """Exact coverage of the printed interval of a rate (Clopper-Pearson), and exact size of the exact
    McNemar test at alpha 0.05.

    Rate interval: min over true rates p in {0.02, 0.05, 0.1, 0.2, 0.3, 0.5} of
    sum_k Binom(k; n, p) [p in CI(k, n)]. McNemar (``scipy.stats.binomtest`` on the discordant
    pairs, the printed test): max over discordance shares {0.05, 0.1, 0.2, 0.4} of
    sum_d Binom(d; n, q) P(p-value < 0.05 | d discordant, H0). No Monte Carlo error.
    """
    from fteval.eval.power import _critical_counts
    from fteval.eval.refusal.rates import rate_interval

    rows = []
    for n in n_values:
        intervals = [rate_interval(k, n, confidence) for k in range(n + 1)]  # the printed interval for k of n
        worst_cov, worst_p = 1.0, None
        for p in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5):
            pmf = sps.binom.pmf(np.arange(n + 1), n, p)
            cov = float(sum(pmf[k] for k, (lo, hi) in enumerate(intervals) if lo <= p <= hi))
            if cov < worst_cov:
                worst_cov, worst_p = cov, p
        rows.append({"setting": f"binary n={n}", "quantity": f"exact CI of a rate (worst p={worst_p})",
                     "kind": "coverage", "rate": worst_cov, "low": None, "high": None, "n": None})
        # P(exact McNemar rejects | d discordant, H0): both tails beyond the critical count c_d
        crit = _critical_counts(n, ALPHA)
        d = np.arange(n + 1)
        reject_given_d = np.where(crit >= 0, 2.0 * sps.binom.cdf(crit, d, 0.5), 0.0)
        size = max(float(sps.binom.pmf(d, n, q) @ reject_given_d) for q in (0.05, 0.1, 0.2, 0.4))
        rows.append({"setting": f"binary n={n}", "quantity": "exact McNemar size (worst discordance)",
                     "kind": "rejection", "rate": size, "low": None, "high": None, "n": None})
    return rows
