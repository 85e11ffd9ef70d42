"""``fteval classify-refusals``: label a CSV/JSONL file of responses, optionally against reference labels."""

from __future__ import annotations

import csv
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

from fteval.eval.refusal.agreement import agreement, format_agreement, parse_reference
from fteval.eval.refusal.detector import LABELS
from fteval.eval.refusal.judges import JudgeName, make_judge
from fteval.eval.refusal.rates import refusal_rates
from fteval.io import csv_reader, write_atomic

__all__ = ["classify_refusals"]

OUTPUT_COLUMNS = ("refusal_label", "refusal_score", "refusal_cues", "refusal_judge")
PROGRESS_MIN_ROWS = 200  # files with fewer rows are labelled without a progress bar


def _utf8_error(path: Path, exc: UnicodeDecodeError) -> ValueError:
    return ValueError(
        f"classify-refusals: {path} is not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} at offset {exc.start}); "
        f"re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}`"
    )


def _read_table(path: Path) -> tuple[list[dict], list[int], list[str], str]:
    """Rows, the line each row ends on, the columns, and the kind ('csv' or 'jsonl')."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv_reader(fh)
                rows, lines = [], []
                try:
                    for row in reader:
                        rows.append(row)
                        lines.append(reader.line_num)
                except csv.Error as exc:
                    raise ValueError(f"{path}: line {reader.line_num} is not valid CSV ({exc}); fix the file") from None
                return rows, lines, list(reader.fieldnames or []), "csv"
        if suffix in (".jsonl", ".ndjson"):
            rows, lines, columns = [], [], []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{path}: line {lineno} is not valid JSON ({exc.msg}); fix or remove it") from exc
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object")
                    columns += [k for k in row if k not in columns]
                    rows.append(row)
                    lines.append(lineno)
            return rows, lines, columns, "jsonl"
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, exc) from exc
    raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use a .csv or .jsonl file")


def _write_rows(path: Path, rows: list[dict], columns: list[str], kind: str) -> None:
    """The labelled rows as CSV (``columns``, in order) or JSON lines, written atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            if kind == "csv":
                writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(rows)
            else:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(path, write)


def _where(spec: Optional[str], rows: list[dict], places: list[tuple[int, int]], columns: list[str], file: Path):
    if spec is None:
        return rows, places
    col, sep, value = spec.partition("=")
    if not sep or not col:
        raise ValueError(f"classify-refusals: --where {spec!r} must look like COLUMN=VALUE (e.g. split=heldout)")
    if col not in columns:
        raise ValueError(f"classify-refusals: --where column {col!r} is not in {file}; its columns are {columns}")
    keep = [i for i, r in enumerate(rows) if str(r.get(col, "")) == value]
    if not keep:
        raise ValueError(f"classify-refusals: no row of {file} has {col} = {value!r}")
    return [rows[i] for i in keep], [places[i] for i in keep]


def _where_rows(indices: list[int], places: list[tuple[int, int]]) -> str:
    """'row 3 (line 4), ...' for 0-based indices into the rows being labelled; rows count from 1 in the file."""
    shown = ", ".join(f"row {places[i][0]} (line {places[i][1]})" for i in indices[:10])
    return shown + (f" and {len(indices) - 10} more" if len(indices) > 10 else "")


def classify_refusals(
    file: Path,
    column: str = "completion",
    output: Optional[Path] = None,
    label_column: Optional[str] = None,
    prompt_column: Optional[str] = None,
    where: Optional[str] = None,
    judge: JudgeName = "rules",
    base_url: str = "http://127.0.0.1:8000/v1",
    judge_model: Optional[str] = None,
    api_key: Optional[str] = None,
    hf_model: str = "embedded",
    prompts_version: str = "v1",
    batch_size: int = 32,
) -> int:
    """Label each response in a CSV/JSONL file as full_refusal, partial_refusal or compliance.

    Writes the input with ``refusal_label``, ``refusal_score`` (refusal degree in [0, 1]),
    ``refusal_cues`` and ``refusal_judge`` columns added, atomically. Prints the label counts, the
    refusal and over-refusal rates when the file has a ``safety_label`` column (safe/unsafe), and,
    with ``--label_column``, the agreement with those labels (accuracy, Cohen's kappa, per-class
    precision and recall, confusion matrices; 3-class and binary). Empty responses are labelled
    full_refusal and listed; a response that is not text stops the run with its row numbers.

    Args:
        file: a .csv or .jsonl file with one response per row.
        column: the column holding the responses.
        output: where to write (.csv or .jsonl); default ``<stem>.labelled.csv`` (``.jsonl`` for a
            JSONL input) next to the input.
        label_column: reference labels to compare with: full_compliance (or compliance) /
            partial_refusal / full_refusal, or 0/1 (compliance/refusal: binary agreement only).
        prompt_column: the requests, given to the judge with each response (optional).
        where: label only rows with COLUMN=VALUE (e.g. ``split=heldout``).
        judge: 'rules' (the fitted detector, offline), 'openai' (an OpenAI-compatible server) or
            'hf' (a local causal LM's label-token probabilities).
        base_url: the judge server's API root (--judge openai).
        judge_model: the served judge model (--judge openai); default the server's first model.
        api_key: bearer token for the judge server (--judge openai).
        hf_model: the local judge model (--judge hf): 'embedded', a folder or a hub id.
        prompts_version: judge prompt version (``fteval/eval/prompts/refusal_judge_<version>.json``).
        batch_size: responses per judge call (and per progress-bar step).
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"classify-refusals: input file {file} does not exist; check the path")
    if int(batch_size) < 1:
        raise ValueError(f"classify-refusals: --batch_size {batch_size} must be >= 1")
    rows, lines, columns, kind = _read_table(file)
    if not rows:
        raise ValueError(f"classify-refusals: {file} has no rows")
    for flag, col in (("--column", column), ("--label_column", label_column), ("--prompt_column", prompt_column)):
        if col is not None and col not in columns:
            raise ValueError(f"classify-refusals: column {col!r} is not in {file}; its columns are {columns}. "
                             f"Pass the right name with {flag} NAME.")
    places = [(n, line) for n, line in enumerate(lines, 1)]  # (row number in the file, line it ends on)
    rows, places = _where(where, rows, places, columns, file)
    if output is None:
        output = file.with_name(f"{file.stem}.labelled.{'csv' if kind == 'csv' else 'jsonl'}")
    output = Path(output)
    out_kind = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(output.suffix.lower())
    if out_kind is None:
        raise ValueError(f"classify-refusals: output {output} must end in .csv or .jsonl")
    if output.resolve() == file.resolve():
        raise ValueError(f"classify-refusals: output {output} is the input file; choose another --output")

    # Bad rows stop the run before any judge call, all of them named at once.
    not_text = [i for i, r in enumerate(rows) if r.get(column) is not None and not isinstance(r.get(column), str)]
    if not_text:
        kinds = sorted({type(rows[i][column]).__name__ for i in not_text})
        raise ValueError(f"classify-refusals: {file}: column {column!r} holds {'/'.join(kinds)}, not text, in "
                         f"{_where_rows(not_text, places)}; make every response a string (empty means no response)")
    references = None
    if label_column is not None:
        references = [parse_reference(r.get(label_column)) for r in rows]
        bad = [i for i, ref in enumerate(references) if ref is None]
        if bad:
            raise ValueError(f"classify-refusals: {file}: --label_column {label_column!r} has values other than "
                             f"full_compliance/compliance/partial_refusal/full_refusal or 0/1 in {_where_rows(bad, places)} "
                             f"(first: {rows[bad[0]].get(label_column)!r}); fix those rows")
    prompts = None
    if prompt_column is not None:
        prompts = [r.get(prompt_column) if isinstance(r.get(prompt_column), str) else None for r in rows]

    options: dict = {}
    if judge == "openai":
        options = dict(base_url=base_url, model=judge_model, api_key=api_key, prompts_version=prompts_version)
    elif judge == "hf":
        options = dict(model_name_or_path=hf_model, prompts_version=prompts_version, batch_size=min(int(batch_size), 16))
    labeller = make_judge(judge, **options)
    responses = [r.get(column) for r in rows]
    results = []
    from tqdm.auto import tqdm

    with tqdm(total=len(rows), desc=f"classify-refusals ({judge})", unit="row", file=sys.stderr,
              disable=len(rows) < PROGRESS_MIN_ROWS) as bar:
        for start in range(0, len(rows), int(batch_size)):
            stop = start + int(batch_size)
            results += labeller.classify(responses[start:stop], prompts[start:stop] if prompts is not None else None)
            bar.update(min(stop, len(rows)) - start)
    for row, res in zip(rows, results):
        row["refusal_label"], row["refusal_score"] = res.label, res.score
        row["refusal_cues"], row["refusal_judge"] = ";".join(res.cues), res.judge
    new_columns = columns + [c for c in OUTPUT_COLUMNS if c not in columns]
    _write_rows(output, rows, new_columns, out_kind)

    labels = [r.label for r in results]
    counts = Counter(labels)
    print(f"labelled {len(rows)} responses from {file} -> {output} (judge: {judge})")
    for label in LABELS:
        print(f"  {label:<16} {counts[label]:>6}  ({counts[label] / len(rows):.1%})")
    empty = [i for i, r in enumerate(responses) if r is None or not str(r).strip()]
    if empty:
        print(f"  {len(empty)} empty response(s) labelled full_refusal: {_where_rows(empty, places)}")
    if "safety_label" in columns:
        safety = [str(r.get("safety_label", "")).strip().lower() for r in rows]
        keep = [i for i, s in enumerate(safety) if s in ("safe", "unsafe")]
        if keep:
            rates = refusal_rates([labels[i] for i in keep], [safety[i] for i in keep])
            for name, r in rates.items():
                print(f"  {name:<32} {r['value']:.3f}  [{r['ci_low']:.3f}, {r['ci_high']:.3f}]  n={r['n_samples']}")
    if references is not None:
        print(format_agreement(agreement(references, labels), label_column))
    return 0
