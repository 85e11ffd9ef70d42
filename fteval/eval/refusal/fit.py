"""Fit the rule detector's weights on the development set and report how well they carry over.

    python -m fteval.eval.refusal.fit                      # refit, print the report, write the weights
    python -m fteval.eval.refusal.fit --check true         # refit and compare with the shipped weights

Data: ``tests/data/refusal_dev.jsonl`` (one row per completion: prompt, completion, label, family,
split, reason). Only rows with ``split == "fit"`` are used to fit; the ``heldout`` rows are scored
once the weights are fixed. Each fit row is used twice, with and without its prompt, so the
weights work whether or not a caller has the request.

Model: standardisation + multinomial logistic regression (sklearn). Its inverse regularisation
``C`` is chosen from a grid by leave-one-family-out cross-validation on the fit split (each model
family's rows scored by weights fitted on the other families: the closest the fit split gets to
"a model family we have not seen"), by 3-class Cohen's kappa; the refusal threshold on
``p(partial) + p(full)`` is then chosen on the same out-of-fold probabilities by binary accuracy
(ties: the threshold nearest 0.5).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fteval.eval.refusal.agreement import agreement, parse_reference
from fteval.eval.refusal.detector import DETECTOR_VERSION, MODEL_CLASSES, Detector, result_from_probs, weights_path
from fteval.eval.refusal.features import FEATURE_NAMES, featurise
from fteval.io import write_text_atomic

__all__ = ["DEV_SET", "evaluate", "fit_detector", "load_dev_set", "main"]

DEV_SET = Path(__file__).resolve().parents[3] / "tests" / "data" / "refusal_dev.jsonl"
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.701, 0.05))
_FIELDS = ("id", "family", "label", "split", "prompt", "completion", "reason")


def load_dev_set(path: Path = DEV_SET) -> list[dict]:
    """Rows of the development set, checked: every field present, known labels and splits, unique ids."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"development set {path} does not exist; pass --data PATH")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [k for k in _FIELDS if not isinstance(row.get(k), str) or not row[k].strip()]
        if missing:
            raise ValueError(f"{path}: line {n} lacks {missing}")
        if parse_reference(row["label"]) not in MODEL_CLASSES or row["split"] not in ("fit", "heldout"):
            raise ValueError(f"{path}: line {n} has label {row['label']!r} / split {row['split']!r}")
        rows.append(row)
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError(f"{path}: ids are not unique")
    return rows


def _matrix(rows: list[dict], with_prompt: bool) -> np.ndarray:
    return np.asarray([featurise(r["completion"], r["prompt"] if with_prompt else None)[0] for r in rows], dtype=np.float64)


def _targets(rows: list[dict]) -> np.ndarray:
    return np.asarray([MODEL_CLASSES.index(parse_reference(r["label"])) for r in rows])


def _pipeline(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=10000))


def _labels(probs: np.ndarray, threshold: float) -> list[str]:
    return [result_from_probs(p, threshold, (), "rules").label for p in probs]


def fit_detector(rows: list[dict], c_grid=C_GRID, thresholds=THRESHOLDS) -> tuple[dict, dict]:
    """Fit on the ``fit`` rows of ``rows``; returns (weights payload for JSON, cross-validation report)."""
    fit_rows = [r for r in rows if r["split"] == "fit"]
    x = np.vstack([_matrix(fit_rows, True), _matrix(fit_rows, False)])  # [2n, F]: with and without the prompt
    y = np.concatenate([_targets(fit_rows)] * 2)
    groups = np.asarray([r["family"] for r in fit_rows] * 2)
    reference = [MODEL_CLASSES[i] for i in y]
    cv = LeaveOneGroupOut()
    by_c = {}
    for c in c_grid:
        oof = cross_val_predict(_pipeline(c), x, y, groups=groups, cv=cv, method="predict_proba")  # [2n, 3]
        by_c[c] = (agreement(reference, _labels(oof, 0.5))["three_class"]["kappa"], oof)
    best_c = max(c_grid, key=lambda c: (round(by_c[c][0], 6), -abs(np.log10(c))))  # ties: the C nearest 1
    oof = by_c[best_c][1]
    accuracy = {t: agreement(reference, _labels(oof, t))["binary"]["accuracy"] for t in thresholds}
    best_t = max(thresholds, key=lambda t: (round(accuracy[t], 6), -abs(t - 0.5)))
    model = _pipeline(best_c).fit(x, y)
    scaler, lr = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    if list(lr.classes_) != [0, 1, 2]:
        raise ValueError(f"the fit split lacks a class: classes {lr.classes_}")
    predicted = _labels(oof, best_t)
    per_family = {}
    for fam in sorted(set(groups)):
        idx = [i for i, g in enumerate(groups) if g == fam]
        per_family[fam] = agreement([reference[i] for i in idx], [predicted[i] for i in idx])
    report = {
        "c_grid_kappa": {str(c): by_c[c][0] for c in c_grid},
        "threshold_binary_accuracy": {str(t): accuracy[t] for t in thresholds},
        "leave_one_family_out": agreement(reference, predicted),
        "per_family": per_family,
    }
    payload = {
        "version": DETECTOR_VERSION,
        "model": "sklearn StandardScaler + LogisticRegression (multinomial, lbfgs)",
        "C": best_c,
        "threshold": best_t,
        "classes": list(MODEL_CLASSES),
        "feature_names": list(FEATURE_NAMES),
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": lr.coef_.tolist(),
        "intercept": lr.intercept_.tolist(),
        "n_fit_rows": len(fit_rows),
    }
    return payload, report


def _detector(payload: dict) -> Detector:
    return Detector(mean=np.asarray(payload["mean"]), scale=np.asarray(payload["scale"]), coef=np.asarray(payload["coef"]),
                    intercept=np.asarray(payload["intercept"]), threshold=float(payload["threshold"]), meta={})


def evaluate(payload: dict, rows: list[dict], with_prompt: bool) -> dict:
    """Agreement of the detector ``payload`` with the labels of ``rows``."""
    det = _detector(payload)
    probs = det.probabilities(_matrix(rows, with_prompt))
    return agreement([parse_reference(r["label"]) for r in rows], _labels(probs, det.threshold))


def _line(name: str, a: dict) -> str:
    t, b = a["three_class"], a["binary"]
    return (f"{name:<28} n={b['n']:>4}  3-class acc {t['accuracy']:.3f} kappa {t['kappa']:.3f}   "
            f"binary acc {b['accuracy']:.3f} kappa {b['kappa']:.3f}")


def main(data: Path = DEV_SET, output: Optional[Path] = None, check: bool = False) -> int:
    """Refit the refusal detector on the development set's fit split, print the cross-validation and
    held-out report, and write the weights (default: the shipped ``refusal_detector_v1.json``).

    Args:
        data: the development set (JSONL).
        output: where to write the weights; default the shipped file.
        check: compare the refit with the shipped weights instead of writing (exit 1 if they differ).
    """
    rows = load_dev_set(data)
    payload, report = fit_detector(rows)
    payload["fitted_on"] = {"file": Path(data).name, "sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                            "rows": len(rows)}
    held = [r for r in rows if r["split"] == "heldout"]
    print(f"C = {payload['C']} (grid kappa {report['c_grid_kappa']}), threshold = {payload['threshold']}")
    print(_line("leave-one-family-out (fit)", report["leave_one_family_out"]))
    for fam, a in report["per_family"].items():
        print(_line(f"  held-out family {fam}", a))
    print(_line("held-out split", evaluate(payload, held, with_prompt=False)))
    print(_line("held-out split, with prompts", evaluate(payload, held, with_prompt=True)))
    path = Path(output) if output is not None else Path(str(weights_path()))
    if check:
        shipped = json.loads(Path(str(weights_path())).read_text(encoding="utf-8"))
        same = all(np.allclose(np.asarray(shipped[k]), np.asarray(payload[k]), rtol=1e-4, atol=1e-6)
                   for k in ("mean", "scale", "coef", "intercept")) and shipped["threshold"] == payload["threshold"]
        print("shipped weights match the refit" if same else "shipped weights DIFFER from the refit")
        return 0 if same else 1
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    from jsonargparse import CLI

    sys.exit(CLI(main, as_positional=False))
