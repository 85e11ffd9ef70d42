"""Monte Carlo calibration of everything ``fteval test`` prints about separation, against a known truth.

Each replication draws the pooled embeddings of N = 2 n prompts (n per class) by three models of
hidden size D and passes them through :func:`fteval.eval.results.summarise`, the function
``fteval test`` calls, so every printed interval and test is checked as printed, Holm step included:

* ``baseline`` (population separation ratio ``ratio_a``), ``alt`` (``ratio_b``, separates more)
  and ``null`` (the baseline's population, its noise correlated with the baseline's per prompt, as
  two models' hidden states of the same prompts are);
* **single**: the baseline's intervals of aqi, aqi_bounded, xbi and chi against their population
  values at the run's N (:func:`fteval.eval.separation.scores_from_ratio` of the true ratio);
* **paired, alternative** (``alt vs baseline``): coverage of the Delta intervals, power;
* **paired, null** (``null vs baseline``): rejection rate of every test at alpha 0.05 (the
  silhouette test included: both models have one distribution, so every population score is
  equal), and the family-wise error after the run's Holm adjustment (any of those tests marked
  significant, with the other pairs' tests in the family as printed);
* **consistency**: printed point estimates outside their own interval (must be none);
* **warning**: how often the heavy-tail warning shows, and the share of missed intervals it marks.

Embeddings are drawn cheaply from a low-rank-plus-diagonal covariance with an LLM-like decaying
spectrum, x = m_k + sqrt(diag) * z + F w (diag_j proportional to 1/j over the hidden size,
``RANK`` dominant directions in F holding 40% of the variance, a common offset as hidden
states have), in four families:

* ``gaussian``: z, w standard normal;
* ``t3``: the same vector times sqrt(3 / chi2_3) per prompt (multivariate t, 3 degrees of freedom:
  covariance 3x the Gaussian's, heavy tails);
* ``outlier``: Gaussian plus, for 5% of the prompts of either class, a fixed offset of squared norm
  4 tr(S) (an outlier cluster; the class means move equally, the covariance grows by
  p (1 - p) ||offset||^2);
* ``subcluster``: Gaussian plus, for 3% of the prompts, a fixed offset that makes that sub-cluster
  carry half the within-class variance (p (1 - p) ||offset||^2 = tr(S_gaussian)).

The paired models share what makes a prompt unusual: the same chi2_3 scale (t3) and the same
outlier or sub-cluster membership, with the Gaussian parts correlated ``CORRELATION``, so the null
model's distribution is exactly the baseline's. The truth is the ratio delta^2 / tr(S) of the
class-mean distance and the covariance trace, in closed form.

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
from fteval.eval.separation import scores_from_ratio

__all__ = ["DISTRIBUTIONS", "Setting", "binary_rows", "default_settings", "merge_runs", "run_setting", "setting_rows",
           "wilson"]

DISTRIBUTIONS = ("gaussian", "t3", "outlier", "subcluster")
METRICS = ("aqi", "aqi_bounded", "xbi", "chi")  # the scores the summary prints with intervals
TESTS = (*METRICS, "silhouette")  # the tests of one pair in the summary's AQI family
RANK = 8  # dominant directions of the covariance (F has RANK columns)
CORRELATION = 0.7  # per-prompt correlation of the paired models' Gaussian noise
OUTLIER_SHARE, OUTLIER_SCALE = 0.05, 4.0  # share of outlier prompts; ||offset||^2 / tr(S_gaussian)
SUBCLUSTER_SHARE = 0.03  # share of sub-cluster prompts; the offset makes them carry half the variance
ALPHA = 0.05
NAMES = ("baseline", "alt", "null")  # the simulated run's variants
ALT, NULL = "alt vs baseline", "null vs baseline"  # the pairs with a known truth


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
    """Draws correlated noise pairs ``[N, D]`` float64 of one family; ``trace`` = tr(S) of either."""

    def __init__(self, distribution: str, dim: int, gen: torch.Generator) -> None:
        self.distribution, self.dim, self.gen = distribution, dim, gen
        diag = 1.0 / torch.arange(1, dim + 1, dtype=torch.float64)  # LLM-like decaying spectrum
        self.sqrt_diag = (0.6 * dim * diag / diag.sum()).sqrt()  # diagonal part holds 60% of tr = dim
        weights = 1.0 / torch.arange(1, RANK + 1, dtype=torch.float64)
        basis, _ = torch.linalg.qr(torch.randn(dim, RANK, generator=gen, dtype=torch.float64))
        self.factor = basis * (0.4 * dim * weights / weights.sum()).sqrt()  # [D, RANK], 40% of tr
        base_trace = float(dim)
        self.offset = torch.randn(dim, generator=gen, dtype=torch.float64)
        self.share, scale = {"outlier": (OUTLIER_SHARE, OUTLIER_SCALE),
                             "subcluster": (SUBCLUSTER_SHARE, 1.0 / (SUBCLUSTER_SHARE * (1 - SUBCLUSTER_SHARE)))
                             }.get(distribution, (0.0, 0.0))
        self.offset *= math.sqrt(scale * base_trace) / self.offset.norm()
        if distribution == "t3":
            self.trace = 3.0 * base_trace  # cov of t_3 = 3 / (3 - 2) x the scale matrix
        else:  # a shifted share p adds p (1 - p) ||offset||^2
            self.trace = base_trace + self.share * (1 - self.share) * scale * base_trace

    def _gaussian(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=self.gen, dtype=torch.float64) * self.sqrt_diag
        return z + torch.randn(n, RANK, generator=self.gen, dtype=torch.float64) @ self.factor.T

    def draw_pair(self, n: int, correlation: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Two noise draws of the same distribution, correlated per prompt (shared scale or membership)."""
        za = self._gaussian(n)
        zb = correlation * za + math.sqrt(1.0 - correlation**2) * self._gaussian(n)
        if self.distribution == "t3":
            g = torch.randn(n, 3, generator=self.gen, dtype=torch.float64).pow(2).sum(dim=1)  # chi2_3
            scale = (3.0 / g).sqrt()[:, None]
            za, zb = za * scale, zb * scale
        elif self.share:
            hit = torch.rand(n, generator=self.gen) < self.share
            za[hit] += self.offset
            zb[hit] += self.offset
        return za, zb


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of k successes in n (``scipy.stats.binomtest``)."""
    ci = sps.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _covers(ci, value: float) -> bool:
    lo = -math.inf if ci[0] is None else ci[0]
    hi = math.inf if ci[1] is None else ci[1]
    return lo <= value <= hi


def _inside(point, ci) -> bool:
    """A printed point inside its printed interval (an undefined point or interval is not checked)."""
    return point is None or not ci or _covers(ci, point) or not math.isfinite(point)


def _outside_count(res: dict) -> int:
    """Printed points outside their own interval in one summary (models and every pair)."""
    bad = 0
    for entry in res["models"].values():
        point = entry.get("bias_corrected", entry["scores"])  # the printed point: plug-in without a bias correction
        bad += sum(not _inside(point[m], entry["ci"][m]) for m in METRICS)
    for comp in res["comparisons"].values():
        bad += sum(not _inside(comp[m]["delta"], comp[m]["ci"]) for m in METRICS)
        bad += not _inside(comp["silhouette"]["mean_diff"], comp["silhouette"]["ci"])
    return bad


def run_setting(setting: Setting, reps: int, seed: int = 0, confidence: float = 0.95, lam: float = DEFAULT_LAMBDA,
                progress: Optional[Callable[[], None]] = None, method: str = "jackknife",
                n_bootstrap: int = 1000) -> dict:
    """Simulate one setting ``reps`` times through :func:`fteval.eval.results.summarise` (module docstring).

    Returns counts: ``single`` / ``paired_alt`` -> {metric: covered}, ``null_reject`` /
    ``alt_reject`` -> {test: p < alpha}, ``defined_alt`` / ``defined_null`` -> {test: replications
    with a test} (xbi's needs both separations above the noise floor), ``holm_fwer`` (replications
    with a true-null test significant after adjustment), ``outside`` (printed points outside their
    interval), ``single_miss`` / ``single_miss_flagged`` / ``paired_miss`` / ``paired_miss_flagged``
    (missed bounded-AQI intervals, and how many carried the heavy-tail warning), ``null_reject_warned``
    (rejections of a true null, over the tests, whose pair carried the warning), ``heavy_flagged``
    (the baseline's warning shown), ``kurtosis`` (the excess kurtosis of its pseudo-values, one per
    replication), ``reps``, ``seconds``. Runs of one setting add up (:func:`merge_runs`). ``method``: the
    summary's ``statistics`` ('jackknife', or 'bootstrap' with ``n_bootstrap`` resamples).
    """
    from fteval.eval.results import SummarySettings, summarise

    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}.")
    gen = torch.Generator().manual_seed(int(seed))
    sampler = _Sampler(setting.distribution, setting.dim, gen)
    n, dim = setting.n_per_class, setting.dim
    labels = (torch.arange(2 * n) >= n).long()  # first n safe, then n unsafe
    index = torch.arange(2 * n)
    u = torch.randn(dim, generator=gen, dtype=torch.float64)
    u /= u.norm()
    common = 10.0 * torch.randn(dim, generator=gen, dtype=torch.float64)  # common offset of hidden states
    lab = labels[:, None].double()

    def shift(ratio: float) -> torch.Tensor:  # class means: common, common + delta u with delta^2 = ratio tr(S)
        return common + lab * (math.sqrt(ratio * sampler.trace) * u)

    mean_a, mean_b = shift(setting.ratio_a), shift(setting.ratio_b)
    truth_a = scores_from_ratio(setting.ratio_a, 2 * n, (0.5, 0.5), lam)
    truth_b = scores_from_ratio(setting.ratio_b, 2 * n, (0.5, 0.5), lam)
    settings = SummarySettings(layer_pooling="mean", lam=lam, confidence=confidence, method=method,
                               n_bootstrap=n_bootstrap)
    adapters = {"alt": "simulated", "null": "simulated"}
    out = {"single": dict.fromkeys(METRICS, 0), "paired_alt": dict.fromkeys(METRICS, 0),
           "null_reject": dict.fromkeys(TESTS, 0), "alt_reject": dict.fromkeys(TESTS, 0),
           "defined_alt": dict.fromkeys(TESTS, 0), "defined_null": dict.fromkeys(TESTS, 0),
           "holm_fwer": 0, "outside": 0, "null_reject_warned": 0, "single_miss": 0, "single_miss_flagged": 0, "paired_miss": 0,
           "paired_miss_flagged": 0, "heavy_flagged": 0, "kurtosis": []}
    start = time.perf_counter()
    for _ in range(reps):
        noise_a, noise_b = sampler.draw_pair(2 * n, CORRELATION)
        # alt and null share their noise (they differ in the class means only), as the earlier fits did
        emb = {"baseline": mean_a + noise_a, "alt": mean_b + noise_b, "null": mean_a + noise_b}
        data = {name: (e[:, None, :], labels, index) for name, e in emb.items()}
        res = summarise(data, "simulated", adapters, settings)
        base = res["models"]["baseline"]
        sep = base.get("separation", {"heavy_tailed": False, "excess_kurtosis": float("nan")})  # none: bootstrap
        flagged = sep["heavy_tailed"]
        out["heavy_flagged"] += flagged
        out["kurtosis"].append(sep["excess_kurtosis"])
        for m in METRICS:
            out["single"][m] += _covers(base["ci"][m], truth_a[m])
        if not _covers(base["ci"]["aqi_bounded"], truth_a["aqi_bounded"]):
            out["single_miss"] += 1
            out["single_miss_flagged"] += flagged
        alt, null = res["comparisons"][ALT], res["comparisons"][NULL]
        for m in TESTS:
            for comp, kind in ((alt, "alt"), (null, "null")):
                if comp[m]["p_value"] is not None:
                    out[f"defined_{kind}"][m] += 1
                    out[f"{kind}_reject"][m] += comp[m]["p_value"] < ALPHA
                    if kind == "null" and comp[m]["p_value"] < ALPHA:
                        out["null_reject_warned"] += comp["heavy_tailed"]
        for m in METRICS:
            if alt[m]["ci"] is not None:
                out["paired_alt"][m] += _covers(alt[m]["ci"], truth_b[m] - truth_a[m])
        if not _covers(alt["aqi_bounded"]["ci"], truth_b["aqi_bounded"] - truth_a["aqi_bounded"]):
            out["paired_miss"] += 1
            out["paired_miss_flagged"] += alt["heavy_tailed"]
        out["holm_fwer"] += any(null[m].get("significant", False) for m in TESTS)
        out["outside"] += _outside_count(res)
        if progress is not None:
            progress()
    out["reps"] = reps
    out["seconds"] = time.perf_counter() - start
    return out


def merge_runs(runs: list[dict]) -> dict:
    """The counts of several :func:`run_setting` runs of one setting (other seeds) as one run."""
    out: dict = {}
    for run in runs:
        for key, value in run.items():
            if isinstance(value, dict):
                target = out.setdefault(key, dict.fromkeys(value, 0))
                for k, v in value.items():
                    target[k] += v
            elif isinstance(value, list):
                out.setdefault(key, []).extend(value)
            else:
                out[key] = out.get(key, 0) + value
    return out


def setting_rows(setting: Setting, res: dict, method: str = "jackknife") -> list[dict]:
    """Table rows of one setting: quantity, kind (coverage, rejection, power, flag, count), rate, Wilson CI;
    ``method`` (the summary's statistics) is recorded in every row."""
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
    for m in TESTS:
        add(f"null rejection Delta {m}", "rejection", res["null_reject"][m], res["defined_null"][m])
    add("family-wise error after Holm", "rejection", res["holm_fwer"], res["reps"])
    add("power Delta aqi_bounded", "power", res["alt_reject"]["aqi_bounded"], res["defined_alt"]["aqi_bounded"])
    add("power Delta silhouette", "power", res["alt_reject"]["silhouette"], res["defined_alt"]["silhouette"])
    add("heavy-tail warning shown", "flag", res["heavy_flagged"], res["reps"])
    add("missed CIs warned (single)", "sensitivity", res["single_miss_flagged"], res["single_miss"])
    add("missed CIs warned (Delta)", "sensitivity", res["paired_miss_flagged"], res["paired_miss"])
    add("false rejections warned", "sensitivity", res["null_reject_warned"], sum(res["null_reject"].values()))
    rows.append({"setting": setting.label, "quantity": "points outside their interval", "kind": "count",
                 "rate": float(res["outside"]), "low": None, "high": None, "n": res["reps"]})
    for r in rows:
        r["method"] = method
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
