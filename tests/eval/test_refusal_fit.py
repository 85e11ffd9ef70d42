"""The development set and the fitted detector: the shipped weights are what the refit gives, and the
held-out split meets the targets (binary agreement >= 0.95, 3-class kappa >= 0.8)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from fteval.eval.refusal import classify_refusal, classify_refusals
from fteval.eval.refusal.detector import FULL, load_detector, weights_path
from fteval.eval.refusal.features import FEATURE_NAMES
from fteval.eval.refusal.fit import DEV_SET, evaluate, fit_detector, load_dev_set

LABELS = ("full_compliance", "partial_refusal", "full_refusal")


@pytest.fixture(scope="module")
def rows():
    return load_dev_set(DEV_SET)


def test_development_set_shape(rows):
    assert len(rows) >= 600
    families = Counter(r["family"] for r in rows)
    assert len(families) >= 6 and min(families.values()) >= 50
    for fam in families:  # every family has every label in both splits
        for split in ("fit", "heldout"):
            assert {r["label"] for r in rows if r["family"] == fam and r["split"] == split} == set(LABELS), (fam, split)
    held = sum(r["split"] == "heldout" for r in rows) / len(rows)
    assert 0.27 <= held <= 0.31  # 30% per (batch, family, label) cell, rounded
    assert len({r["completion"] for r in rows}) == len(rows)


def test_shipped_weights_are_the_refit(rows):
    """Refitting on the fit split (C and threshold chosen by leave-one-family-out CV) reproduces the
    shipped JSON; lbfgs converges to the same optimum up to its tolerance, hence rtol 1e-3."""
    shipped = json.loads(weights_path().read_text(encoding="utf-8"))
    assert shipped["fitted_on"]["sha256"] == hashlib.sha256(DEV_SET.read_bytes()).hexdigest(), (
        "the development set changed since the weights were fitted: run `python -m fteval.eval.refusal.fit`")
    payload, report = fit_detector(rows)
    assert tuple(payload["feature_names"]) == FEATURE_NAMES
    assert payload["C"] == shipped["C"] and payload["threshold"] == shipped["threshold"]
    for key in ("mean", "scale", "coef", "intercept"):
        np.testing.assert_allclose(payload[key], shipped[key], rtol=1e-3, atol=1e-4, err_msg=key)
    lofo = report["leave_one_family_out"]
    assert lofo["binary"]["accuracy"] >= 0.95 and lofo["three_class"]["kappa"] >= 0.8


def test_heldout_targets(rows, tmp_path, capsys):
    held = [r for r in rows if r["split"] == "heldout"]
    payload = json.loads(weights_path().read_text(encoding="utf-8"))
    result = evaluate(payload, held, with_prompt=False)
    assert result["binary"]["accuracy"] >= 0.95 and result["three_class"]["kappa"] >= 0.8
    # the command prints the same numbers
    classify_refusals(DEV_SET, label_column="label", where="split=heldout", output=tmp_path / "h.jsonl")
    out = capsys.readouterr().out
    t, b = result["three_class"], result["binary"]
    assert f"3-class: accuracy {t['accuracy']:.3f}   Cohen's kappa {t['kappa']:.3f}   (n={len(held)})" in out
    assert f"accuracy {b['accuracy']:.3f}   Cohen's kappa {b['kappa']:.3f}   (n={len(held)})" in out


def test_detector_is_fast_and_loaded_once():
    det = load_detector()
    assert det is load_detector()  # cached: the JSON is parsed once per process
    import time

    text = "I can't help with that. " * 3 + "Instead, here are some resources: 1. A helpline. 2. A counsellor."
    start = time.perf_counter()
    for _ in range(200):
        assert classify_refusal(text).label == FULL
    assert (time.perf_counter() - start) / 200 < 0.02  # seconds per response; measured ~1 ms on the 2-core CPU


def test_mismatched_weights_are_refused(tmp_path, monkeypatch):
    from fteval.eval.refusal import detector

    bad = json.loads(weights_path().read_text(encoding="utf-8"))
    bad["feature_names"] = bad["feature_names"][:-1]
    path = tmp_path / "refusal_detector_v1.json"
    path.write_text(json.dumps(bad))
    monkeypatch.setattr(detector, "weights_path", lambda version="v1": path)
    detector.load_detector.cache_clear()
    try:
        with pytest.raises(ValueError, match="fitted on other features .* refit it with `python -m fteval.eval.refusal.fit`"):
            detector.load_detector()
    finally:
        detector.load_detector.cache_clear()
