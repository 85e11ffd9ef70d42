"""Versioned judge prompts shipped in ``fteval/eval/prompts/<stem>_<version>.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources


def load_prompt_file(stem: str, version: str, required: Sequence[str], what: str) -> dict:
    """The JSON prompt file ``<stem>_<version>.json``, checked: it exists (else the known versions are
    listed), declares that version, and has every ``required`` key. ``what`` names it in errors."""
    folder = resources.files("fteval.eval").joinpath("prompts")
    path = folder.joinpath(f"{stem}_{version}.json")
    if not path.is_file():
        prefix = f"{stem}_"
        known = sorted(p.name[len(prefix):-len(".json")] for p in folder.iterdir() if p.name.startswith(prefix))
        raise ValueError(f"{what} version {version!r} does not exist; available versions: {known}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("version") != version:
        raise ValueError(f"{path} declares version {data.get('version')!r}, not {version!r}; fix the file's version field")
    missing = [k for k in required if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    return data
