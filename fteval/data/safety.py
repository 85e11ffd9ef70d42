"""Keyword-based harm categoriser for prompts, and its agreement with a dataset's own labels.

This is a transparent first pass (the spec's "keyword-based safety categorisation"), not a
classifier to trust alone: the data statistics report its confusion matrix and Cohen's kappa
against the dataset's labels so the gap is visible. Patterns are matched case-insensitively on
word boundaries; a prompt may fall into several categories.
"""

from __future__ import annotations

import re
from collections import Counter

from sklearn.metrics import cohen_kappa_score, confusion_matrix

# Category -> word stems. Stems end where a \w* suffix is allowed ("hack" matches "hacking").
HARM_KEYWORDS: dict[str, tuple[str, ...]] = {
    "violence": ("kill", "murder", "assault", "attack", "hurt", "beat up", "stab", "strangle", "torture", "kidnap"),
    "weapons": ("gun", "firearm", "rifle", "bomb", "explosive", "grenade", "silencer", "ammunition", "weapon"),
    "drugs": ("meth", "cocaine", "heroin", "fentanyl", "drug", "narcotic", "overdose", "lsd", "mdma"),
    "cybercrime": ("hack", "malware", "ransomware", "phish", "keylogger", "ddos", "exploit", "botnet", "password"),
    "fraud": ("scam", "fraud", "counterfeit", "launder", "forge", "fake id", "ponzi", "embezzl", "tax evasion"),
    "self_harm": ("suicide", "self-harm", "self harm", "cut myself", "end my life", "starve myself", "kill myself"),
    "hate": ("slur", "inferior race", "hate", "racist", "sexist", "bigot", "ethnic cleansing", "nazi"),
    "harassment": ("harass", "bully", "humiliate", "threaten", "intimidat", "blackmail", "revenge"),
    "privacy": ("dox", "home address", "stalk", "track someone", "spy on", "private messages", "social security number"),
    "extremism": ("terror", "extremis", "radicali", "jihad", "militia", "manifesto"),
    "dangerous_chemicals": ("poison", "toxic gas", "nerve agent", "ricin", "chlorine gas", "anthrax", "bioweapon"),
    "theft": ("steal", "shoplift", "burglar", "break into", "pick a lock", "carjack", "rob "),
    "misinformation": ("fake news", "disinformation", "propaganda", "hoax", "conspiracy", "rig the election"),
}

_PATTERNS = {
    cat: re.compile(r"\b(?:" + "|".join(re.escape(k).replace(r"\ ", r"\s+") for k in words) + r")\w*", re.IGNORECASE)
    for cat, words in HARM_KEYWORDS.items()
}


def categorise(text: str) -> list[str]:
    """Harm categories whose keywords occur in ``text`` (empty list: no keyword matched)."""
    return [cat for cat, pattern in _PATTERNS.items() if pattern.search(text or "")]


def predict_unsafe(text: str) -> bool:
    """True when any harm keyword matches."""
    return bool(categorise(text))


def keyword_agreement(texts: list[str], labels: list[int]) -> dict:
    """Agreement of the keyword categoriser with dataset labels (1 = unsafe, 0 = safe).

    Returns the confusion matrix ``[[tn, fp], [fn, tp]]`` (rows: dataset label, columns: keyword
    prediction), accuracy, Cohen's kappa, and per-category counts split by dataset label.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; they must pair up")
    preds = [int(predict_unsafe(t)) for t in texts]
    cm = confusion_matrix(labels, preds, labels=[0, 1])
    per_cat: dict[str, Counter] = {cat: Counter() for cat in HARM_KEYWORDS}
    for text, label in zip(texts, labels):
        for cat in categorise(text):
            per_cat[cat]["unsafe" if label else "safe"] += 1
    n = max(len(texts), 1)
    kappa = cohen_kappa_score(labels, preds) if len(set(labels)) > 1 or len(set(preds)) > 1 else 1.0
    return {
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_layout": "rows = dataset label (safe, unsafe); columns = keyword prediction (safe, unsafe)",
        "accuracy": float((cm[0, 0] + cm[1, 1]) / n),
        "cohen_kappa": float(kappa),
        "per_category": {cat: dict(c) for cat, c in per_cat.items() if c},
    }
