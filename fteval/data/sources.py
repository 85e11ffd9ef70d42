"""Where rows come from: a hub dataset id, a local jsonl/json/csv/parquet file, or a bundled sample.

Every source is read into a list of plain ``dict`` rows; the schema checks live with the
callers (:mod:`fteval.data.datamodule`), which know which columns they need.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# Bundled samples, written for this project in the schemas of the hub datasets.
BUNDLED = {
    "alignment-instructions": "alignment_instructions.jsonl",  # Vaibhaav/alignment-instructions schema
    "accd": "accd_sample.jsonl",  # hasnat79/ACCD schema
}
HUB_IDS = {
    "alignment-instructions": "Vaibhaav/alignment-instructions",
    "accd": "hasnat79/ACCD",
}
_LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataSourceError(ValueError):
    """A data source that cannot be read or does not have the expected shape."""


def bundled_path(kind: str) -> Path:
    """Path of the bundled sample for ``kind`` ('alignment-instructions' or 'accd')."""
    if kind not in BUNDLED:
        raise DataSourceError(f"no bundled sample named {kind!r}; known: {sorted(BUNDLED)}")
    return Path(str(importlib.resources.files("fteval.data") / "sample" / BUNDLED[kind]))


def describe_source(source: str, kind: str) -> str:
    """Human-readable name of a source for messages and statistics."""
    if source == "sample":
        return f"bundled sample {bundled_path(kind).name}"
    if source == "hub":
        return HUB_IDS[kind]
    return source


def load_records(source: str, kind: str, split: str = "train", limit: Optional[int] = None) -> list[dict]:
    """Read rows from ``source``.

    Args:
        source: 'sample' (the bundled sample for ``kind``), 'hub' (the dataset's canonical hub id),
            a path to a .jsonl/.json/.csv/.parquet file, or any hub dataset id.
        kind: 'alignment-instructions' or 'accd' (selects the bundled sample / hub id).
        split: split name for hub datasets.
        limit: keep at most this many rows (in file order), for quick runs.
    """
    import datasets

    datasets.disable_progress_bars()
    if source == "sample":
        source = str(bundled_path(kind))
    elif source == "hub":
        source = HUB_IDS[kind]
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in _LOCAL_BUILDERS or path.exists():
            if not path.is_file():
                raise DataSourceError(f"data file {path} does not exist; check the path")
            builder = _LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataSourceError(
                    f"data file {path} has suffix {path.suffix!r}; use .jsonl, .json, .csv or .parquet"
                )
            if not path.read_bytes().strip():
                raise DataSourceError(f"data file {path} is empty; it must hold at least one row")
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        else:
            ds = datasets.load_dataset(source, split=split)
    except DataSourceError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unreachable data
        where = f"file {path}" if path.exists() else f"hub dataset {source!r} (split {split!r})"
        raise DataSourceError(
            f"could not read {where}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}. "
            "Fix: check the file is valid jsonl/csv/parquet, or for a hub id check the name and network; "
            "offline, use source 'sample' or a local file."
        ) from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    rows = ds.to_list()
    if not rows:
        raise DataSourceError(f"{describe_source(str(source), kind)} has no rows; it must not be empty")
    return rows


def require_columns(rows: list[dict], columns: list[str], source: str) -> None:
    """Raise one clear error if any of ``columns`` is missing from the rows of ``source``."""
    have = set(rows[0].keys()) if rows else set()
    missing = [c for c in columns if c not in have]
    if missing:
        raise DataSourceError(
            f"{source} is missing column(s) {missing}; it has {sorted(have)}. Fix: rename the columns "
            "or set the column mapping in the data config (e.g. --data.prompt_field / --data.eval_text_field)"
        )
