"""`fteval db export`: every table of the database to CSV, JSON and (optionally) Parquet."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from fteval.db.connection import inspect_file, open_readonly
from fteval.io import write_atomic, write_text_atomic

__all__ = ["export", "EXPORT_FORMATS"]

EXPORT_FORMATS = ("csv", "json", "parquet")


def _csv_text(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def export(
    db_path: Path = Path("output/centralized.db"),
    output_dir: Path = Path("output/db_export"),
    formats: list[str] = ["csv", "json"],  # noqa: B006 (read-only default shown in --help)
) -> None:
    """Export every table of the experiment database to files, one per table and format.

    CSV files have a header row and write NULL as an empty field (floats at full
    precision); JSON files hold a list of row objects with NULL as null; Parquet needs
    pyarrow. Files are written atomically (temporary file, then rename) as
    ``<output_dir>/<table>.<format>``. The database is opened read-only and never migrated.

    Args:
        db_path: the SQLite database to read.
        output_dir: folder for the exported files (created if missing).
        formats: any of csv, json, parquet.
    """
    db_path, output_dir = Path(db_path), Path(output_dir)
    formats = [f.lower() for f in formats]
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad or not formats:
        raise ValueError(f"Unknown export format(s) {bad or formats}; choose from {', '.join(EXPORT_FORMATS)}.")
    if "parquet" in formats:
        try:
            import pyarrow  # noqa: F401
            import pyarrow.parquet  # noqa: F401
        except ImportError as err:
            raise ImportError("Parquet export needs pyarrow: pip install pyarrow, or leave out 'parquet'.") from err
    if not db_path.is_file():
        raise FileNotFoundError(f"No database at {db_path}; run a fit/test/env first or pass --db_path.")
    inspect_file(db_path)  # raises for foreign / corrupt / newer files
    output_dir.mkdir(parents=True, exist_ok=True)

    conn = open_readonly(db_path)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        summary = []
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}" ORDER BY rowid')  # names come from sqlite_master
            columns = [d[0] for d in cur.description]
            rows = [tuple(r) for r in cur.fetchall()]
            if "csv" in formats:
                text = _csv_text(columns, rows)
                write_text_atomic(output_dir / f"{table}.csv", text)
            if "json" in formats:
                records = [dict(zip(columns, r)) for r in rows]
                text_json = json.dumps(records, indent=1, ensure_ascii=False)
                write_text_atomic(output_dir / f"{table}.json", text_json)
            if "parquet" in formats:
                import pyarrow as pa
                import pyarrow.parquet as pq

                arrow = pa.Table.from_pylist([dict(zip(columns, r)) for r in rows]) if rows else pa.table(
                    {c: pa.array([], pa.null()) for c in columns})
                write_atomic(output_dir / f"{table}.parquet", lambda p: pq.write_table(arrow, p))
            summary.append((table, len(rows)))
    finally:
        conn.close()
    width = max(len(t) for t, _ in summary) if summary else 5
    print(f"Exported {len(summary)} tables from {db_path} to {output_dir} ({', '.join(formats)}):")
    for table, n in summary:
        print(f"  {table:<{width}}  {n:>8} rows")
