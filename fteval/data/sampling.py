"""Row-level preparation of the data module's sets: text keys, de-duplication, the balanced sample, length summaries.

Pure functions on lists of rows (dicts) and labels; :class:`fteval.data.datamodule.AlignmentDataModule`
reads the sources, formats and tokenizes, and calls these.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter

import numpy as np
from sklearn.model_selection import train_test_split

__all__ = ["SOURCE_ROW", "balanced_stratified_sample", "deduplicate", "length_stats", "normalise_text"]


def normalise_text(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive key used for near-duplicate detection."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = re.sub(r"[^\w\s]", "", text)
    return " ".join(text.split())


SOURCE_ROW = "source_row"  # a row's 0-based position in its source file / dataset split


def deduplicate(rows: list[dict], key_field: str) -> tuple[list[dict], dict]:
    """Drop exact duplicate rows, then rows whose ``key_field`` repeats after normalisation (first kept).

    A ``source_row`` key (where each row came from) is not part of a row's content."""
    seen_exact, seen_norm, kept = set(), set(), []
    exact = near = 0
    for row in rows:
        exact_key = json.dumps({k: v for k, v in row.items() if k != SOURCE_ROW}, sort_keys=True, default=str)
        if exact_key in seen_exact:
            exact += 1
            continue
        seen_exact.add(exact_key)
        norm = normalise_text(row[key_field])
        if norm in seen_norm:
            near += 1
            continue
        seen_norm.add(norm)
        kept.append(row)
    return kept, {"exact_duplicates_removed": exact, "normalised_duplicates_removed": near}


def balanced_stratified_sample(
    labels: list[int], strata: list[str], n_per_class: int, seed: int
) -> tuple[list[int], int]:
    """Indices of a class-balanced sample, stratified by ``strata`` within each class.

    Each class gets ``min(n_per_class, size of the smaller class)`` rows so the sample stays
    balanced; within a class rows are drawn in proportion to their stratum (sklearn's
    ``train_test_split(stratify=...)``). Returns (sorted indices, per-class count).
    """
    labels_arr = np.asarray(labels)
    by_class = {c: np.flatnonzero(labels_arr == c) for c in (0, 1)}
    n = min(n_per_class, *(len(v) for v in by_class.values()))
    chosen: list[int] = []
    for c, idx in by_class.items():
        if n >= len(idx):
            chosen.extend(idx.tolist())
            continue
        sub_strata = [strata[i] for i in idx]
        counts = Counter(sub_strata)
        stratify = sub_strata if min(counts.values()) >= 2 and n >= len(counts) else None
        take, _ = train_test_split(idx, train_size=n, stratify=stratify, random_state=seed)
        chosen.extend(np.asarray(take).tolist())
    return sorted(chosen), n


def length_stats(lengths: list[int]) -> dict:
    """min, mean, median, 95th percentile and max of token counts; empty for no counts."""
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {
        "min": int(a.min()),
        "mean": round(float(a.mean()), 2),
        "p50": float(np.percentile(a, 50)),
        "p95": float(np.percentile(a, 95)),
        "max": int(a.max()),
    }
