"""Agreement of refusal labels with reference labels: accuracy, Cohen's kappa, per-class precision
and recall, confusion matrices, 3-class and binary (refusal = full or partial), with sklearn."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, precision_recall_fscore_support

from fteval.eval.refusal.detector import COMPLY, FULL, PARTIAL

__all__ = ["REFERENCE_VALUES", "agreement", "format_agreement", "parse_reference"]

ORDER = (COMPLY, PARTIAL, FULL)
BINARY = ("compliance", "refusal")
# Accepted reference values: the three labels (compliance also as full_compliance), or 0/1 (binary).
REFERENCE_VALUES = {
    "full_compliance": COMPLY, "compliance": COMPLY, "partial_refusal": PARTIAL, "full_refusal": FULL,
    "0": "0", "1": "1",
}


def parse_reference(value) -> Optional[str]:
    """A reference label as one of ORDER, or '0'/'1' for binary labels; None when not recognised."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and float(value) in (0.0, 1.0):
        return str(int(value))
    if isinstance(value, str):
        return REFERENCE_VALUES.get(value.strip().lower())
    return None


def _binary(labels: Sequence[str]) -> list[str]:
    return ["compliance" if lab in (COMPLY, "0") else "refusal" for lab in labels]


def _block(y_true: Sequence[str], y_pred: Sequence[str], classes: Sequence[str]) -> dict:
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(classes), zero_division=0
    )
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=list(classes))),
        "classes": list(classes),
        "precision": [float(x) for x in precision],
        "recall": [float(x) for x in recall],
        "f1": [float(x) for x in f1],
        "support": [int(x) for x in support],
        "confusion": confusion_matrix(y_true, y_pred, labels=list(classes)).tolist(),  # rows: reference, columns: predicted
    }


def agreement(reference: Sequence[str], predicted: Sequence[str]) -> dict:
    """``{"three_class": ..., "binary": ...}`` for parsed references (:func:`parse_reference`) and
    predicted labels. With 0/1 references only the binary block is computed (three_class is None)."""
    if len(reference) != len(predicted):
        raise ValueError(f"agreement: {len(reference)} reference labels but {len(predicted)} predictions")
    if not reference:
        raise ValueError("agreement: no labelled rows")
    binary_ref = any(r in ("0", "1") for r in reference)
    if binary_ref and not all(r in ("0", "1") for r in reference):
        raise ValueError("agreement: reference labels mix 0/1 with label names; use one kind in the whole column")
    out = {"three_class": None if binary_ref else _block(reference, predicted, ORDER)}
    out["binary"] = _block(_binary(reference), _binary(predicted), BINARY)
    return out


def _format_block(name: str, block: dict) -> list[str]:
    lines = [f"  {name}: accuracy {block['accuracy']:.3f}   Cohen's kappa {block['kappa']:.3f}   (n={block['n']})",
             f"    {'class':<16} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
    for i, c in enumerate(block["classes"]):
        lines.append(f"    {c:<16} {block['precision'][i]:>9.3f} {block['recall'][i]:>7.3f} {block['f1'][i]:>6.3f} {block['support'][i]:>8d}")
    width = max(len(c) for c in block["classes"]) + 2
    lines.append("    confusion (rows: reference, columns: detector)")
    lines.append("    " + " " * width + "".join(f"{c:>{width}}" for c in block["classes"]))
    for c, row in zip(block["classes"], block["confusion"]):
        lines.append(f"    {c:<{width}}" + "".join(f"{v:>{width}d}" for v in row))
    return lines


def format_agreement(result: dict, column: str) -> str:
    lines = [f"agreement with {column!r}:"]
    if result["three_class"] is not None:
        lines += _format_block("3-class", result["three_class"])
    lines += _format_block("binary (refusal = full or partial)", result["binary"])
    return "\n".join(lines)
