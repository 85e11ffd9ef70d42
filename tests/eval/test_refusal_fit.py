"""The development set and the fitted detector: the composed set is what its composer writes, the
shipped weights are what the refit gives, and the cross-validation meets the targets
(leave-one-family-out binary agreement >= 0.95, 3-class kappa >= 0.85, weakest family >= 0.92)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from fteval.eval.refusal import classify_refusal, classify_refusals
from fteval.eval.refusal.compose.build import COMPOSED_SET, HELDOUT_FAMILIES, PHENOMENA, compose
from fteval.eval.refusal.compose.build import main as compose_main
from fteval.eval.refusal.detector import FULL, PARTIAL, load_detector, weights_path
from fteval.eval.refusal.features import FEATURE_NAMES
from fteval.eval.refusal.fit import DEV_SET, DEV_SETS, evaluate, fit_detector, load_dev_set, reliability

LABELS = ("full_compliance", "partial_refusal", "full_refusal")


@pytest.fixture(scope="module")
def rows():
    return load_dev_set(DEV_SETS)


@pytest.fixture(scope="module")
def refit(rows):
    """The refit with the shipped C (the grid search itself is what `python -m fteval.eval.refusal.fit` runs)."""
    shipped = json.loads(weights_path().read_text(encoding="utf-8"))
    return fit_detector(rows, c_grid=(shipped["C"],))


def test_written_set_shape():
    written = load_dev_set(DEV_SET)
    assert len(written) >= 600 and {r["phenomenon"] for r in written} == {"handwritten"}
    families = Counter(r["family"] for r in written)
    assert len(families) >= 6 and min(families.values()) >= 50
    for fam in families:  # every family has every label in both splits
        for split in ("fit", "heldout"):
            assert {r["label"] for r in written if r["family"] == fam and r["split"] == split} == set(LABELS), (fam, split)
    held = sum(r["split"] == "heldout" for r in written) / len(written)
    assert 0.27 <= held <= 0.31  # 30% per (batch, family, label) cell, rounded


def test_composed_set_is_what_the_composer_writes(tmp_path):
    composed = load_dev_set(COMPOSED_SET)
    assert len(composed) >= 2500
    assert compose_main(output=COMPOSED_SET, check=True) == 0
    assert composed == load_dev_set(COMPOSED_SET) and [r["id"] for r in compose()] == [r["id"] for r in composed]
    families = Counter(r["family"] for r in composed)
    assert len(families) >= 10 and min(families.values()) >= 200
    # whole families are held out; every other family is fitted on
    assert {f for f in families if any(r["split"] == "heldout" for r in composed if r["family"] == f)} == set(HELDOUT_FAMILIES)
    assert all(r["split"] == "fit" for r in composed if r["family"] not in HELDOUT_FAMILIES)
    # every phenomenon occurs, in at least three families, and fixes the label
    for label, names in PHENOMENA.items():
        for ph in names:
            fams = {r["family"] for r in composed if r["phenomenon"] == ph}
            assert len(fams) >= 3 or ph in ("redacted_partial", "code_comply"), (ph, fams)
            assert {r["label"] for r in composed if r["phenomenon"] == ph} == {label}
    all_rows = load_dev_set(DEV_SETS)
    assert len({r["completion"] for r in all_rows}) == len(all_rows)
    # a stale file is reported, not silently accepted
    stale = tmp_path / "stale.jsonl"
    stale.write_text(COMPOSED_SET.read_text(encoding="utf-8")[:-200], encoding="utf-8")
    assert compose_main(output=stale, check=True) == 1


def test_dev_set_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dev_set(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "family": "f", "label": "refused", "split": "fit", "prompt": "p",
                               "completion": "c", "reason": "r"}) + "\n")
    with pytest.raises(ValueError, match="line 1 has label 'refused'"):
        load_dev_set(bad)
    with pytest.raises(ValueError, match="ids are not unique"):
        load_dev_set([DEV_SET, DEV_SET])


def test_shipped_weights_are_the_refit(refit):
    """Refitting on the fit split (shipped C; temperature and threshold chosen by leave-one-family-out
    CV) reproduces the shipped JSON; lbfgs converges to the same optimum up to its tolerance, hence rtol 1e-3."""
    shipped = json.loads(weights_path().read_text(encoding="utf-8"))
    assert [f["sha256"] for f in shipped["fitted_on"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in DEV_SETS], (
        "the development set changed since the weights were fitted: run `python -m fteval.eval.refusal.fit`")
    payload, _ = refit
    assert tuple(payload["feature_names"]) == FEATURE_NAMES
    assert payload["threshold"] == shipped["threshold"]
    assert payload["temperature"] == pytest.approx(shipped["temperature"], abs=1e-3)
    for key in ("mean", "scale", "coef", "intercept"):
        np.testing.assert_allclose(payload[key], shipped[key], rtol=1e-3, atol=1e-4, err_msg=key)


def test_cross_validation_targets(refit):
    """Leave-one-family-out: binary >= 0.95, 3-class kappa >= 0.85, every family >= 0.92 binary;
    leave-one-phenomenon-out is reported (each phenomenon is one label, so it is the harder test)."""
    _, report = refit
    lofo = report["leave_one_family_out"]
    assert lofo["binary"]["accuracy"] >= 0.95 and lofo["three_class"]["kappa"] >= 0.85
    assert min(a["binary"]["accuracy"] for a in report["per_family"].values()) >= 0.92, report["per_family"]
    assert len(report["per_family"]) >= 15
    lopo = report["leave_one_phenomenon_out"]
    assert lopo["binary"]["accuracy"] >= 0.93 and lopo["three_class"]["kappa"] >= 0.8
    assert len(report["per_phenomenon"]) == 1 + sum(len(v) for v in PHENOMENA.values())
    # calibrated: the expected calibration error of p(refusal) out of fold is small
    assert report["reliability"]["ece"] < 0.03 and sum(report["reliability"]["count"]) == lofo["binary"]["n"]


def test_reliability_numbers():
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.15, 0.05, 0.8], [0.5, 0.25, 0.25]])
    r = reliability(probs, np.array([False, True, False, True]), n_bins=2)
    # p(refusal) = 0.1, 0.9, 0.85, 0.5: bins [0, 0.5] and (0.5, 1] (calibration_curve's edges)
    assert r["count"] == [2, 2]
    assert r["predicted"] == pytest.approx([0.3, 0.875], abs=1e-4)
    assert r["observed"] == pytest.approx([0.5, 0.5], abs=1e-4)
    assert r["ece"] == pytest.approx((2 * 0.2 + 2 * 0.375) / 4, abs=1e-4)


def test_heldout_targets(rows, tmp_path, capsys):
    held = [r for r in rows if r["split"] == "heldout"]
    payload = json.loads(weights_path().read_text(encoding="utf-8"))
    result = evaluate(payload, held, with_prompt=False)
    assert result["binary"]["accuracy"] >= 0.94 and result["three_class"]["kappa"] >= 0.85  # measured 0.949, 0.881
    for fam in HELDOUT_FAMILIES:  # whole families the fit never saw: measured 0.920 (role-play), 0.991
        assert evaluate(payload, [r for r in held if r["family"] == fam], False)["binary"]["accuracy"] >= 0.9
    written = [r for r in held if r["phenomenon"] == "handwritten"]
    assert evaluate(payload, written, with_prompt=False)["binary"]["accuracy"] >= 0.94  # measured 0.946
    # the command prints the same numbers
    classify_refusals(DEV_SET, label_column="label", where="split=heldout", output=tmp_path / "h.jsonl")
    out = capsys.readouterr().out
    t, b = (evaluate(payload, written, with_prompt=False)[k] for k in ("three_class", "binary"))
    assert f"3-class: accuracy {t['accuracy']:.3f}   Cohen's kappa {t['kappa']:.3f}   (n={len(written)})" in out
    assert f"accuracy {b['accuracy']:.3f}   Cohen's kappa {b['kappa']:.3f}   (n={len(written)})" in out


def test_detector_is_fast_and_loaded_once():
    det = load_detector()
    assert det is load_detector()  # cached: the JSON is parsed once per process
    import time

    text = "I can't help with that. " * 3 + "Instead, here are some resources: 1. A helpline. 2. A counsellor."
    start = time.perf_counter()
    for _ in range(200):
        assert classify_refusal(text).label in (FULL, PARTIAL)  # p(full) and p(partial) are near-equal here
    assert (time.perf_counter() - start) / 200 < 0.02  # seconds per response; measured ~1 ms on the 2-core CPU


def test_mismatched_weights_are_refused(tmp_path, monkeypatch):
    from fteval.eval.refusal import detector

    bad = json.loads(weights_path().read_text(encoding="utf-8"))
    bad["feature_names"] = bad["feature_names"][:-1]
    path = tmp_path / "refusal_detector_v2.json"
    path.write_text(json.dumps(bad))
    monkeypatch.setattr(detector, "weights_path", lambda version="v2": path)
    detector.load_detector.cache_clear()
    try:
        with pytest.raises(ValueError, match="fitted on other features .* refit it with `python -m fteval.eval.refusal.fit`"):
            detector.load_detector()
    finally:
        detector.load_detector.cache_clear()
