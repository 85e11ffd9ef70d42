"""Where rows come from: a hub dataset id, a local jsonl/json/csv/parquet file, or a bundled sample.

Every source is read into a list of plain ``dict`` rows; the schema checks live with the
callers (:mod:`fteval.data.datamodule`), which know which columns they need.
"""

from __future__ import annotations

import importlib.resources
import logging
from pathlib import Path
from typing import Optional

from fteval.io import csv_reader

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
_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


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


def _read_local(path: Path) -> list[dict]:
    """Rows of a local .jsonl/.json/.csv/.parquet file, read directly.

    Local files are read with the standard library (and pyarrow for parquet) rather than
    ``datasets.load_dataset``, which would cache an Arrow copy of every file under the user's home;
    errors name the file and, for JSON lines, the line. Rows missing a column get ``None`` for it
    (the callers' checks then name the row), as a table would.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataSourceError(
                f"data file {path} is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8"
            ) from None
        if suffix == ".csv":
            import csv
            import io

            try:
                rows = list(csv_reader(io.StringIO(text, newline="")))
            except csv.Error as exc:
                raise DataSourceError(f"data file {path} is not valid CSV: {exc}; fix the file") from None
            if any(None in r for r in rows):  # more cells than header names
                bad = next(i for i, r in enumerate(rows) if None in r)
                raise DataSourceError(
                    f"data file {path} line {bad + 2} has more cells than the header; quote fields that contain commas"
                )
        else:
            rows = _parse_json_rows(text, path, lines=suffix == ".jsonl")
    columns: dict[str, None] = {}
    for r in rows:
        columns.update(dict.fromkeys(r))
    return [{c: r.get(c) for c in columns} for r in rows]


def _parse_json_rows(text: str, path: Path, lines: bool) -> list[dict]:
    import json

    if not lines:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # maybe JSON lines under a .json name
        if isinstance(data, list) and all(isinstance(r, dict) for r in data):
            return data
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise DataSourceError(f"data file {path}: its columns have different lengths {sorted(lengths)}")
            keys = list(data)
            return [dict(zip(keys, vals)) for vals in zip(*data.values())]
        if data is not None:
            raise DataSourceError(
                f"data file {path} must hold a list of objects, an object of equal-length column lists, "
                "or one JSON object per line"
            )
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataSourceError(
                f"data file {path} line {lineno} is not valid JSON ({exc.msg} at column {exc.colno}); fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise DataSourceError(f"data file {path} line {lineno} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
    return rows


def load_records(source: str, kind: str, split: str = "train", limit: Optional[int] = None) -> list[dict]:
    """Read rows from ``source``.

    Args:
        source: 'sample' (the bundled sample for ``kind``), 'hub' (the dataset's canonical hub id),
            a path to a .jsonl/.json/.csv/.parquet file, or any hub dataset id.
        kind: 'alignment-instructions' or 'accd' (selects the bundled sample / hub id).
        split: split name for hub datasets.
        limit: keep at most this many rows (in file order), for quick runs.
    """
    if source == "sample":
        source = str(bundled_path(kind))
    elif source == "hub":
        source = HUB_IDS[kind]
    path = Path(source).expanduser()
    try:
        if path.suffix.lower() in _LOCAL_SUFFIXES or path.exists():
            if not path.is_file():
                raise DataSourceError(f"data file {path} does not exist; check the path")
            if path.suffix.lower() not in _LOCAL_SUFFIXES:
                raise DataSourceError(
                    f"data file {path} has suffix {path.suffix!r}; use .jsonl, .json, .csv or .parquet"
                )
            if not path.read_bytes().strip():
                raise DataSourceError(f"data file {path} is empty; it must hold at least one row")
            rows = _read_local(path)
        else:
            import datasets

            datasets.disable_progress_bars()
            rows = datasets.load_dataset(source, split=split).to_list()
    except DataSourceError:
        raise
    except Exception as exc:  # pyarrow and datasets raise many types for unreadable or unreachable data
        where = f"file {path}" if path.exists() else f"hub dataset {source!r} (split {split!r})"
        raise DataSourceError(
            f"could not read {where}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}. "
            "Fix: check the file is valid jsonl/csv/parquet, or for a hub id check the name and network; "
            "offline, use source 'sample' or a local file."
        ) from exc
    if limit is not None:
        rows = rows[:limit]
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
