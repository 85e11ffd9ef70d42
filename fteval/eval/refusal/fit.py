"""Fit the rule detector's weights on the development set and report how well they carry over.

    python -m fteval.eval.refusal.fit                      # refit, print the report, write the weights
    python -m fteval.eval.refusal.fit --check true         # refit and compare with the shipped weights

Data (one row per completion: id, family, label, split, prompt, completion, reason, and optionally
phenomenon): ``tests/data/refusal_dev.jsonl`` (written one by one in the styles of nine model
families; phenomenon ``handwritten``) and ``tests/data/refusal_dev_composed.jsonl`` (composed by
:mod:`fteval.eval.refusal.compose.build` in ten more styles, each row naming its phenomenon). Only
rows with ``split == "fit"`` are fitted; ``heldout`` rows (30% of the written set, and two whole
composed families) are scored once the weights are fixed. Each fit row is used twice, with and
without its prompt, so the weights work whether or not a caller has the request. The two parts
weigh the same in the fit (sample weights), so the larger composed part does not drown the written one.

Model: standardisation + multinomial logistic regression (sklearn). Its inverse regularisation
``C`` is chosen from a grid by cross-validation that holds out what the fit has not seen: each model
family scored by weights fitted on the other families (leave-one-family-out), and each phenomenon
by weights fitted without it (leave-one-phenomenon-out); the criterion is the mean of the two
3-class Cohen's kappas. On the leave-one-family-out probabilities a temperature is then fitted
(scipy, minimising the log loss: the probabilities are calibrated), and the refusal threshold on
``p(partial) + p(full)`` is chosen by binary accuracy (ties: the threshold nearest 0.5).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import LeaveOneGroupOut, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fteval.eval.refusal.agreement import agreement, parse_reference
from fteval.eval.refusal.detector import DETECTOR_VERSION, MODEL_CLASSES, Detector, result_from_probs, weights_path
from fteval.eval.refusal.features import FEATURE_NAMES, featurise
from fteval.io import write_text_atomic

__all__ = ["DEV_SET", "DEV_SETS", "evaluate", "fit_detector", "load_dev_set", "main", "reliability"]

_DATA = Path(__file__).resolve().parents[3] / "tests" / "data"
DEV_SET = _DATA / "refusal_dev.jsonl"
DEV_SETS = (DEV_SET, _DATA / "refusal_dev_composed.jsonl")
C_GRID = (0.03, 0.1, 0.3, 1.0)
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.30, 0.701, 0.05))
HANDWRITTEN = "handwritten"  # the phenomenon of rows that do not name one
_FIELDS = ("id", "family", "label", "split", "prompt", "completion", "reason")


def load_dev_set(paths: Path | Sequence[Path] = DEV_SETS) -> list[dict]:
    """Rows of the development set(s), checked: every field present, known labels and splits, unique ids.
    A row without ``phenomenon`` gets ``handwritten``."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    rows = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"development set {path} does not exist; pass --data PATH")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in _FIELDS if not isinstance(row.get(k), str) or not row[k].strip()]
            if missing:
                raise ValueError(f"{path}: line {n} lacks {missing}")
            if parse_reference(row["label"]) not in MODEL_CLASSES or row["split"] not in ("fit", "heldout"):
                raise ValueError(f"{path}: line {n} has label {row['label']!r} / split {row['split']!r}")
            row.setdefault("phenomenon", HANDWRITTEN)
            rows.append(row)
    if len({r["id"] for r in rows}) != len(rows):
        raise ValueError(f"{', '.join(map(str, paths))}: ids are not unique")
    return rows


def _matrix(rows: list[dict], with_prompt: bool) -> np.ndarray:
    return np.asarray([featurise(r["completion"], r["prompt"] if with_prompt else None)[0] for r in rows], dtype=np.float64)


def _targets(rows: list[dict]) -> np.ndarray:
    return np.asarray([MODEL_CLASSES.index(parse_reference(r["label"])) for r in rows])


def _weights(rows: list[dict]) -> np.ndarray:
    """Sample weights under which the written and the composed rows weigh the same in all (mean 1)."""
    written = np.asarray([r["phenomenon"] == HANDWRITTEN for r in rows])
    n_w, n_c = int(written.sum()), int((~written).sum())
    if not n_w or not n_c:
        return np.ones(len(rows))
    w = np.where(written, len(rows) / (2 * n_w), len(rows) / (2 * n_c))
    return w


def _pipeline(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=10000))


def _labels(probs: np.ndarray, threshold: float) -> list[str]:
    return [result_from_probs(p, threshold, (), "rules").label for p in probs]


def _temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by ``temperature`` (a softmax of the log-probabilities)."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def _fit_temperature(probs: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """The temperature minimising the weighted log loss of out-of-fold probabilities (scipy, bounded)."""

    def loss(t: float) -> float:
        p = _temper(probs, t)[np.arange(len(y)), y]
        return float(-(w * np.log(np.clip(p, 1e-12, 1.0))).sum() / w.sum())

    return round(float(minimize_scalar(loss, bounds=(0.25, 4.0), method="bounded").x), 4)


def reliability(probs: np.ndarray, refused: np.ndarray, n_bins: int = 10) -> dict:
    """Reliability of p(refusal) = p(partial) + p(full): per occupied bin of width 1/n_bins, the mean
    predicted probability, the observed refusal rate and the count (sklearn's calibration_curve), and
    the expected calibration error (count-weighted mean |observed - predicted|)."""
    p_ref = probs[:, 1] + probs[:, 2]
    observed, predicted = calibration_curve(refused.astype(int), p_ref, n_bins=n_bins, strategy="uniform")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p_ref), minlength=n_bins)  # the bins calibration_curve uses
    counts = counts[counts > 0]
    ece = float(np.sum(counts * np.abs(observed - predicted)) / counts.sum())
    return {"predicted": predicted.round(4).tolist(), "observed": observed.round(4).tolist(), "count": counts.tolist(),
            "ece": round(ece, 4)}


def _grouped(reference: list[str], predicted: list[str], groups: np.ndarray) -> dict:
    """Agreement per group; a group of one label (every phenomenon) has an undefined kappa (nan), unwarned."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        for g in sorted(set(groups)):
            idx = np.flatnonzero(groups == g)
            out[str(g)] = agreement([reference[i] for i in idx], [predicted[i] for i in idx])
    return out


def fit_detector(rows: list[dict], c_grid=C_GRID, thresholds=THRESHOLDS) -> tuple[dict, dict]:
    """Fit on the ``fit`` rows of ``rows``; returns (weights payload for JSON, cross-validation report)."""
    fit_rows = [r for r in rows if r["split"] == "fit"]
    x = np.vstack([_matrix(fit_rows, True), _matrix(fit_rows, False)])  # [2n, F]: with and without the prompt
    y = np.concatenate([_targets(fit_rows)] * 2)
    w = np.concatenate([_weights(fit_rows)] * 2)
    families = np.asarray([r["family"] for r in fit_rows] * 2)
    phenomena = np.asarray([r["phenomenon"] for r in fit_rows] * 2)
    reference = [MODEL_CLASSES[i] for i in y]
    cv = LeaveOneGroupOut()
    fit_params = {"logisticregression__sample_weight": w}

    def out_of_fold(c: float, groups: np.ndarray) -> np.ndarray:  # [2n, 3]
        return cross_val_predict(_pipeline(c), x, y, groups=groups, cv=cv, method="predict_proba", params=fit_params)

    by_c = {}
    for c in c_grid:
        oof_family, oof_phenomenon = out_of_fold(c, families), out_of_fold(c, phenomena)
        kappas = [agreement(reference, _labels(o, 0.5))["three_class"]["kappa"] for o in (oof_family, oof_phenomenon)]
        by_c[c] = (float(np.mean(kappas)), kappas, oof_family, oof_phenomenon)
    best_c = max(c_grid, key=lambda c: (round(by_c[c][0], 6), -abs(np.log10(c))))  # ties: the C nearest 1
    _, _, oof_family, oof_phenomenon = by_c[best_c]
    temperature = _fit_temperature(oof_family, y, w)
    calibrated = _temper(oof_family, temperature)
    accuracy = {t: agreement(reference, _labels(calibrated, t))["binary"]["accuracy"] for t in thresholds}
    best_t = max(thresholds, key=lambda t: (round(accuracy[t], 6), -abs(t - 0.5)))
    model = _pipeline(best_c).fit(x, y, **fit_params)
    scaler, lr = model.named_steps["standardscaler"], model.named_steps["logisticregression"]
    if list(lr.classes_) != [0, 1, 2]:
        raise ValueError(f"the fit split lacks a class: classes {lr.classes_}")
    predicted = _labels(calibrated, best_t)
    predicted_phenomenon = _labels(_temper(oof_phenomenon, temperature), best_t)
    refused = y > 0
    report = {
        "c_grid_kappa": {str(c): {"mean": by_c[c][0], "family": by_c[c][1][0], "phenomenon": by_c[c][1][1]} for c in c_grid},
        "threshold_binary_accuracy": {str(t): accuracy[t] for t in thresholds},
        "leave_one_family_out": agreement(reference, predicted),
        "per_family": _grouped(reference, predicted, families),
        "leave_one_phenomenon_out": agreement(reference, predicted_phenomenon),
        "per_phenomenon": _grouped(reference, predicted_phenomenon, phenomena),
        "reliability_uncalibrated": reliability(oof_family, refused),
        "reliability": reliability(calibrated, refused),
    }
    payload = {
        "version": DETECTOR_VERSION,
        "model": "sklearn StandardScaler + LogisticRegression (multinomial, lbfgs), logits / temperature",
        "C": best_c,
        "temperature": temperature,
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
                    intercept=np.asarray(payload["intercept"]), threshold=float(payload["threshold"]),
                    temperature=float(payload.get("temperature", 1.0)), meta={})


def evaluate(payload: dict, rows: list[dict], with_prompt: bool) -> dict:
    """Agreement of the detector ``payload`` with the labels of ``rows``."""
    det = _detector(payload)
    probs = det.probabilities(_matrix(rows, with_prompt))
    return agreement([parse_reference(r["label"]) for r in rows], _labels(probs, det.threshold))


def _line(name: str, a: dict) -> str:
    t, b = a["three_class"], a["binary"]
    return (f"{name:<40} n={b['n']:>5}  3-class acc {t['accuracy']:.3f} kappa {t['kappa']:.3f}   "
            f"binary acc {b['accuracy']:.3f} kappa {b['kappa']:.3f}")


def _binary_line(name: str, a: dict) -> str:
    return f"{name:<40} n={a['binary']['n']:>5}  binary acc {a['binary']['accuracy']:.3f}"


def main(data: Optional[list[Path]] = None, output: Optional[Path] = None, check: bool = False) -> int:
    """Refit the refusal detector on the development set's fit split, print the cross-validation and
    held-out report, and write the weights (default: the shipped ``refusal_detector_<version>.json``).

    Args:
        data: the development set files (JSONL); default the written and the composed set.
        output: where to write the weights; default the shipped file.
        check: compare the refit with the shipped weights instead of writing (exit 1 if they differ).
    """
    paths = [Path(p) for p in data] if data else list(DEV_SETS)
    rows = load_dev_set(paths)
    payload, report = fit_detector(rows)
    payload["fitted_on"] = [{"file": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths]
    payload["reliability"] = report["reliability"]
    print(f"C = {payload['C']} (grid kappa, mean of leave-one-family-out and leave-one-phenomenon-out: "
          f"{ {c: round(v['mean'], 4) for c, v in report['c_grid_kappa'].items()} }), temperature = {payload['temperature']}, "
          f"threshold = {payload['threshold']}")
    print(_line("leave-one-family-out (fit)", report["leave_one_family_out"]))
    for fam, a in report["per_family"].items():
        print(_line(f"  held-out family {fam}", a))
    print(_line("leave-one-phenomenon-out (fit)", report["leave_one_phenomenon_out"]))
    for ph, a in report["per_phenomenon"].items():
        print(_binary_line(f"  held-out phenomenon {ph}", a))
    for name in ("reliability_uncalibrated", "reliability"):
        r = report[name]
        print(f"{name}: ECE {r['ece']:.4f}; bins (predicted, observed, n): "
              + ", ".join(f"({p:.2f}, {o:.2f}, {n})" for p, o, n in zip(r["predicted"], r["observed"], r["count"])))
    held = [r for r in rows if r["split"] == "heldout"]
    print(_line("held-out split", evaluate(payload, held, with_prompt=False)))
    print(_line("held-out split, with prompts", evaluate(payload, held, with_prompt=True)))
    for fam in sorted({r["family"] for r in held}):
        print(_line(f"  held-out split, family {fam}", evaluate(payload, [r for r in held if r["family"] == fam], False)))
    path = Path(output) if output is not None else Path(str(weights_path()))
    if check:
        shipped = json.loads(Path(str(weights_path())).read_text(encoding="utf-8"))
        same = all(np.allclose(np.asarray(shipped[k]), np.asarray(payload[k]), rtol=1e-4, atol=1e-6)
                   for k in ("mean", "scale", "coef", "intercept")) and all(
            shipped[k] == payload[k] for k in ("threshold", "C")) and abs(shipped["temperature"] - payload["temperature"]) < 1e-3
        print("shipped weights match the refit" if same else "shipped weights DIFFER from the refit")
        return 0 if same else 1
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    from jsonargparse import CLI

    sys.exit(CLI(main, as_positional=False))
