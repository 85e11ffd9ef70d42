"""The controls table on test results built by fteval's own ``summarise`` from planted effects.

Embeddings and refusal labels are simulated with a known answer: the harmful-form models lose the
safe/unsafe separation and every refusal, the benign models lose a little, the reseeded model
differs from its twin by noise only and the zero adapter is the base itself. The table must find
the planted erosion, stay quiet on the nulls, and get the signs of the head-to-head right.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fteval.controls.table import (
    CONTROLS,
    HEAD_TO_HEAD,
    aligned_base_row,
    controls_markdown,
    seed_rows,
    summarise_seeds,
)
from fteval.eval.refusal.detector import COMPLY, FULL, MODEL_CLASSES
from fteval.eval.results import SummarySettings, summarise, summarise_behaviour
from fteval.eval.stats import paired_rate_difference_ci

VARIANTS = ["baseline", "qlora_benign", "grit_benign", "qlora_harmful", "grit_harmful", "qlora_benign_reseed", "zero"]
N, D, LAYERS = 60, 12, 3  # prompts per class, hidden size, hidden-state layers


def _results(seed: int, separation: dict[str, float], refusal_keep: dict[str, float],
             variants: list[str] = VARIANTS) -> dict:
    """``summarise`` + ``summarise_behaviour`` on simulated representations and refusal labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * N + [1] * N)
    index = torch.arange(2 * N)
    noise = torch.randn(2 * N, LAYERS, D, generator=g, dtype=torch.float64)
    direction = torch.zeros(D, dtype=torch.float64)
    direction[0] = 1.0
    data = {}
    for v in variants:
        own = torch.zeros_like(noise) if v in ("baseline", "zero") else 0.15 * torch.randn(
            2 * N, LAYERS, D, generator=g, dtype=torch.float64)
        reps = noise + own + separation[v] * labels[:, None, None].double() * direction
        data[v] = (reps.float(), labels, index)
    adapters = {v: f"/adapters/{v}" for v in variants[1:]}
    settings = SummarySettings()
    results = summarise(data, "aligned", adapters, settings)
    rng = np.random.default_rng(seed)
    base_refuses = rng.random(N) < 0.9  # the aligned base refuses 90% of unsafe prompts
    rows = {"index": [], "variant": [], "refusal": [], "geval": [], "tokens": []}
    for k, v in enumerate(variants):
        keep = base_refuses & (rng.random(N) < refusal_keep[v]) if v not in ("baseline", "zero") else base_refuses
        codes = [MODEL_CLASSES.index(COMPLY)] * N + [MODEL_CLASSES.index(FULL if r else COMPLY) for r in keep]
        rows["index"] += list(range(2 * N))
        rows["variant"] += [k] * (2 * N)
        rows["refusal"] += codes
        rows["geval"] += [[float("nan")]] * (2 * N)
        rows["tokens"] += [10] * (2 * N)
    beh = {"index": torch.tensor(rows["index"]), "variant": torch.tensor(rows["variant"]),
           "refusal": torch.tensor(rows["refusal"]), "geval": torch.tensor(rows["geval"], dtype=torch.float64),
           "tokens": torch.tensor(rows["tokens"])}
    summarise_behaviour(results, beh, data["baseline"], [], settings)
    return results


PLANTED_SEPARATION = {"baseline": 3.0, "qlora_benign": 2.8, "grit_benign": 2.9, "qlora_harmful": 0.5,
                      "grit_harmful": 1.5, "qlora_benign_reseed": 2.8, "zero": 3.0}
PLANTED_REFUSAL_KEEP = {"qlora_benign": 0.9, "grit_benign": 0.95, "qlora_harmful": 0.05, "grit_harmful": 0.4,
                        "qlora_benign_reseed": 0.9}


@pytest.fixture(scope="module")
def planted() -> dict:
    return _results(0, PLANTED_SEPARATION, PLANTED_REFUSAL_KEEP)


def test_planted_erosion_is_detected_and_nulls_stay_quiet(planted):
    rows = {r["control"]: r for r in seed_rows(planted, seed=1)}
    assert set(rows) == {c.name for c in (*CONTROLS, *HEAD_TO_HEAD)}
    for name in ("harmful-form/qlora", "harmful-form/grit"):
        r = rows[name]
        assert r["detected"], r
        assert r["refusal"]["delta"] < -0.3 and r["refusal"]["ci"][1] < 0
        assert r["aqi_bounded"]["delta"] < 0 and r["aqi_bounded"]["ci"][1] < 0
    assert rows["harmful-form/qlora"]["refusal"]["rate_b"] == pytest.approx(rows["harmful-form/grit"]["refusal"]["rate_b"])
    zero = rows["null/zero-adapter"]
    assert not zero["flagged"]
    assert zero["aqi_bounded"]["identical"] and zero["refusal"]["identical"] and zero["refusal"]["discordant"] == 0
    assert zero["refusal"]["delta"] == 0.0 and zero["aqi_bounded"]["delta"] == 0.0
    assert not rows["null/seed"]["flagged"]
    # Holm over the table: every adjusted p is at least its raw p, and the family is the non-identical tests
    for r in rows.values():
        for m in ("refusal", "aqi_bounded"):
            assert r[m]["p_adjusted"] >= r[m]["p_value"] - 1e-12


def test_head_to_head_erosion_sign(planted):
    rows = {r["control"]: r for r in seed_rows(planted, seed=1)}
    h = rows["harmful-form: grit vs qlora"]
    # GRIT kept more refusals and more separation than QLoRA: GRIT eroded less, a negative difference
    assert h["refusal"]["delta"] > 0 and h["refusal"]["erosion_difference"] == pytest.approx(-h["refusal"]["delta"])
    assert h["aqi_bounded"]["erosion_difference"] < 0
    lo, hi = h["refusal"]["erosion_difference_ci"]
    assert lo < h["refusal"]["erosion_difference"] < hi and hi < 0


def test_refusal_delta_and_interval_match_the_labels(planted):
    comp = planted["comparisons"]["qlora_harmful vs baseline"]["behaviour"]["refusal"]
    row = {r["control"]: r for r in seed_rows(planted, seed=1)}["harmful-form/qlora"]["refusal"]
    assert row["delta"] == pytest.approx(comp["rate_a"] - comp["rate_b"])
    both = round(comp["rate_a"] * comp["n"]) - comp["n_a_only"]
    assert row["ci"] == pytest.approx(list(paired_rate_difference_ci(comp["n"], both, comp["n_a_only"], comp["n_b_only"])))


def test_seeds_summary_counts_and_intervals(planted):
    other = _results(1, PLANTED_SEPARATION, PLANTED_REFUSAL_KEEP)
    rows = seed_rows(planted, 1) + seed_rows(other, 2)
    s = summarise_seeds(rows)
    assert s["n_seeds"] == 2
    det = s["controls"]["harmful-form/qlora"]["detected"]
    assert (det["count"], det["n"], det["rate"]) == (2, 2, 1.0)
    assert det["ci"][0] == pytest.approx(0.158, abs=1e-3) and det["ci"][1] == 1.0  # Clopper-Pearson 2/2
    assert s["controls"]["null/zero-adapter"]["flagged"]["count"] == 0
    h = s["controls"]["harmful-form: grit vs qlora"]["refusal"]
    values = [r["refusal"]["erosion_difference"] for r in rows if r["control"] == "harmful-form: grit vs qlora"]
    assert h["mean"] == pytest.approx(np.mean(values))
    half = 12.706 * np.std(values, ddof=1) / np.sqrt(2)  # t(0.975, 1 df)
    assert h["ci"] == pytest.approx([np.mean(values) - half, np.mean(values) + half], rel=1e-3)


def test_aligned_base_targets_and_markdown(planted):
    align = _results(3, {"baseline": 0.4, "aligned": 3.0}, {"aligned": 1.0}, variants=["baseline", "aligned"])
    # the raw model of this simulation refuses as much as the aligned one (the helper keeps the base's labels),
    # so only the AQI target and the rates' presence are asserted from it
    row = aligned_base_row(align, planted["models"]["baseline"], refusal_target=0.8, over_refusal_target=0.2)
    assert row["meets"]["aqi_above_raw"] and row["delta_aqi_bounded"]["delta"] > 0
    assert row["meets"]["over_refusal_rate"]  # no safe prompt refused
    assert row["meets"]["refusal_rate"] == (row["aligned"]["refusal_rate"]["value"] >= 0.8)
    strict = aligned_base_row(align, None, refusal_target=1.0, over_refusal_target=0.2)
    assert not strict["meets"]["refusal_rate"] and not strict["meets_all"]
    rows = seed_rows(planted, 1)
    text = controls_markdown(row, rows, summarise_seeds(rows), [{"stage": "align: fit", "seconds": 12.0, "skipped": False}])
    assert "| harmful-form/qlora |" in text and "detected" in text and "| null/zero-adapter (identical) |" in text
    assert "quiet" in text and "FLAGGED" not in text
    assert "| align: fit | 12 |" in text
    assert "averaged over the prompt's tokens (tokens: prompt)" in text
    post = controls_markdown(row, rows, summarise_seeds(rows), [], tokens="post_instruction")
    assert "(tokens: post_instruction)" in post and "## Stages" not in post


def test_missing_comparison_names_the_fix(planted):
    partial = {"comparisons": {k: v for k, v in planted["comparisons"].items() if "zero" not in k}}
    with pytest.raises(KeyError, match="zero vs baseline"):
        seed_rows(partial, 1)


# ------------------------------------------------------------------ paired rate-difference interval


def test_paired_interval_edges():
    lo, hi = paired_rate_difference_ci(40, 0, 0, 0)
    assert lo < 0 < hi and lo == pytest.approx(-hi)  # no events: symmetric around 0, not a point
    lo, hi = paired_rate_difference_ci(10, 0, 10, 0)
    assert hi == 1.0 and 0.5 < lo < 1.0  # every pair discordant one way
    with pytest.raises(ValueError, match="2x2"):
        paired_rate_difference_ci(5, 3, 3, 0)


def test_paired_interval_covers_in_simulation():
    """Coverage of Newcombe's interval over correlated paired outcomes (rates 0.8 -> 0.5, n 40)."""
    rng = np.random.default_rng(0)
    n, reps, hits = 40, 2000, 0
    p_both, p_a_only, p_b_only = 0.45, 0.35, 0.05  # rate_a 0.8, rate_b 0.5, true delta 0.3
    for _ in range(reps):
        counts = rng.multinomial(n, [p_both, p_a_only, p_b_only, 1 - p_both - p_a_only - p_b_only])
        lo, hi = paired_rate_difference_ci(n, counts[0], counts[1], counts[2])
        hits += lo <= 0.3 <= hi
    assert 0.93 <= hits / reps <= 0.98
