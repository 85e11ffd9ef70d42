"""`ExperimentDB`: the one small data layer every stage writes through.

Not an ORM: typed insert helpers that validate their input and run parameterised SQL,
each inside one transaction, and query helpers that return plain dicts. Table names are
never taken from callers unchecked (only the names in :data:`fteval.db.schema.TABLES`
are spliced into SQL).

Concurrency: one :class:`ExperimentDB` per process (and per thread); open it in the child
after a fork, never share it. SQLite's WAL journal lets readers run while one writer
commits; writers queue on the busy timeout (60 s), and ``BEGIN IMMEDIATE`` takes the write
lock at the start of a transaction so two writers never deadlock upgrading read locks.
Under multi-process training only rank zero writes (see ``callbacks/run_logger.py``).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from datetime import datetime, timezone
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Union

from fteval.db.connection import open_and_migrate, utc_now
from fteval.db.schema import METRIC_TABLES, TABLES
from fteval.db.values import as_float, path_digest, redact_secrets, to_json

__all__ = ["ExperimentDB", "STATUSES"]

STATUSES = ("running", "finished", "failed", "interrupted", "crashed")

# A 'running' row of another host whose heartbeat is older than this is taken for dead (seconds).
STALE_HEARTBEAT_S = 6 * 3600

# Columns accepted by the row-list insert helpers: (required, optional); ``details`` goes
# to ``details_json``.
_ROW_SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aqi_scores": (("model", "metric", "value"), ("layer", "pooling", "ci_low", "ci_high", "p_value", "n_samples")),
    "behavioral_metrics": (("model", "metric", "value"), ("category", "ci_low", "ci_high", "n_samples")),
    "model_responses": (
        ("model", "prompt", "response"),
        ("prompt_id", "safety_label", "axiom", "refusal_label", "refusal_judge", "backend", "latency_s", "n_tokens"),
    ),
    "comparative_analysis": (("subject", "metric", "value"), ("details",)),
}
_REAL_COLUMNS = frozenset({"value", "ci_low", "ci_high", "p_value", "latency_s"})


class ExperimentDB:
    """The centralized experiment database (``output/centralized.db`` by default).

    Opening validates the file (a non-SQLite, corrupt or foreign file, or one from a newer
    fteval, raises :class:`fteval.db.DatabaseFileError` and is left untouched), switches it
    to WAL with foreign keys on, and applies pending migrations after writing a backup
    copy ``<name>.bak-v<old version>`` (its path is in :attr:`backup_path`).

    Args:
        path: the database file; missing parent folders are created.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)
        self._conn, self.backup_path = open_and_migrate(self.path)
        self._depth = 0  # transaction nesting level (> 1 uses SAVEPOINTs)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ExperimentDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ExperimentDB({str(self.path)!r})"

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"{self!r} is closed; open a new ExperimentDB.")
        return self._conn

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator["ExperimentDB"]:
        """One atomic write: everything inside commits together or, on any exception, not at all.

        Nested use is allowed: an inner block is a SAVEPOINT, rolled back alone when it
        raises (the exception still propagates to the outer block).
        """
        conn = self.conn
        if self._depth == 0:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no lock upgrade, no deadlock
            begin, commit, rollback = None, "COMMIT", "ROLLBACK"
        else:
            name = f"sp{self._depth}"
            begin, commit, rollback = f"SAVEPOINT {name}", f"RELEASE {name}", f"ROLLBACK TO {name}"
            conn.execute(begin)
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            conn.execute(rollback)
            if self._depth > 0:
                conn.execute(commit)  # a rolled-back savepoint must still be released
            raise
        self._depth -= 1
        conn.execute(commit)

    # -- experiments ----------------------------------------------------------------------
    def create_experiment(
        self,
        name: Optional[str],
        method: str,
        config: Optional[Mapping[str, Any]] = None,
        seed: Optional[int] = None,
        git_commit: Optional[str] = None,
        packages: Optional[Mapping[str, Any]] = None,
        hardware: Optional[Mapping[str, Any]] = None,
        *,
        stage: str = "fit",
    ) -> int:
        """Insert an experiment row with status ``running``; returns its id.

        Args:
            name: a label; None gives ``"<method>-<stage>-<UTC time>"``.
            method: e.g. ``qlora``, ``grit``, ``aqi``.
            config: the resolved configuration (JSON-serialisable; secrets are redacted).
            seed: the global seed, if one was set.
            git_commit: the source revision, None outside a git checkout.
            packages: package name -> version.
            hardware: the machine description (see ``fteval.envinfo``).
            stage: ``fit`` | ``test`` | ``validate`` | ``env`` | ...
        """
        if not isinstance(method, str) or not method.strip():
            raise ValueError(f"Experiment method must be a non-empty string, got {method!r}.")
        self.mark_dead_runs()
        started = utc_now()
        name = name or f"{method}-{stage}-{started[:19].replace(':', '')}"
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO experiments (name, method, stage, status, config_json, seed, git_commit,"
                " packages_json, hardware_json, started_at, pid, host, heartbeat_at)"
                " VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, method, stage, to_json(config), None if seed is None else int(seed), git_commit,
                 to_json(packages), to_json(hardware), started, os.getpid(), socket.gethostname(), started),
            )
        return int(cur.lastrowid)

    def heartbeat(self, experiment_id: int) -> None:
        """Record that the process running ``experiment_id`` is alive (and is this process)."""
        with self.transaction():
            self.conn.execute("UPDATE experiments SET heartbeat_at = ?, pid = ?, host = ? WHERE id = ?",
                              (utc_now(), os.getpid(), socket.gethostname(), experiment_id))

    def mark_dead_runs(self, stale_after_s: float = STALE_HEARTBEAT_S) -> list[int]:
        """Set ``crashed`` on 'running' rows whose process is gone; return their ids.

        On this host a row's process is gone when its pid no longer exists or now belongs to a
        process started after the row's last heartbeat (a reused pid). Rows of other hosts are
        judged by their heartbeat, older than ``stale_after_s``. Rows without a pid (written before
        schema version 3) are left alone.
        """
        import psutil

        host, now = socket.gethostname(), datetime.now(timezone.utc)
        dead = []
        for row in self.conn.execute(
            "SELECT id, pid, host, heartbeat_at FROM experiments WHERE status = 'running' AND pid IS NOT NULL"
        ).fetchall():
            exp_id, pid, row_host, beat = row[0], row[1], row[2], row[3]
            beat_at = datetime.fromisoformat(beat) if beat else None
            if row_host == host:
                try:
                    alive = pid == os.getpid() or beat_at is None or psutil.Process(pid).create_time() <= beat_at.timestamp()
                except psutil.NoSuchProcess:
                    alive = False
            else:
                alive = beat_at is None or (now - beat_at).total_seconds() < stale_after_s
            if not alive:
                dead.append(int(exp_id))
        for exp_id in dead:
            self.finish_experiment(exp_id, "crashed", error="the process running it ended without recording a "
                                   "status (killed, out of memory or power loss); found by the next run")
        return dead

    def finish_experiment(self, experiment_id: int, status: str = "finished", error: Optional[str] = None) -> None:
        """Set an experiment's status (``finished`` | ``failed`` | ``interrupted`` | ``crashed`` | ``running``).

        ``running`` (a resumed run) clears ``finished_at`` and ``error`` and records this process as the runner.
        """
        if status not in STATUSES:
            raise ValueError(f"Experiment status {status!r} is not one of {STATUSES}.")
        finished = None if status == "running" else utc_now()
        with self.transaction():
            cur = self.conn.execute(
                "UPDATE experiments SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                (status, finished, None if error is None else redact_secrets(str(error))[:4000], experiment_id),
            )
            if cur.rowcount == 0:
                raise ValueError(f"No experiment with id {experiment_id} in {self.path}.")
            if status == "running":
                self.conn.execute("UPDATE experiments SET heartbeat_at = ?, pid = ?, host = ? WHERE id = ?",
                                  (utc_now(), os.getpid(), socket.gethostname(), experiment_id))

    def experiments(
        self, method: Optional[str] = None, stage: Optional[str] = None, status: Optional[str] = None
    ) -> list[dict[str, Any]]:
        """Experiment rows (JSON columns decoded: ``config``, ``packages``, ``hardware``), oldest first."""
        return self.rows("experiments", method=method, stage=stage, status=status)

    def experiment(self, experiment_id: int) -> dict[str, Any]:
        """One experiment row as a dict; ValueError when the id is unknown."""
        found = self.rows("experiments", id=experiment_id)
        if not found:
            raise ValueError(f"No experiment with id {experiment_id} in {self.path}.")
        return found[0]

    def _require_experiment(self, experiment_id: Optional[int], optional: bool = False) -> Optional[int]:
        if experiment_id is None and optional:
            return None
        if not isinstance(experiment_id, int) or isinstance(experiment_id, bool):
            raise ValueError(f"experiment_id must be an int (from create_experiment), got {experiment_id!r}.")
        if self.conn.execute("SELECT 1 FROM experiments WHERE id = ?", (experiment_id,)).fetchone() is None:
            raise ValueError(f"No experiment with id {experiment_id} in {self.path}; create it first.")
        return experiment_id

    # -- training metrics -----------------------------------------------------------------
    @staticmethod
    def metrics_table(method: str) -> str:
        """Name of the per-step metrics table for a training method (``qlora`` or ``grit``)."""
        table = METRIC_TABLES.get(str(method).lower())
        if table is None:
            raise ValueError(f"No training-metrics table for method {method!r}; use one of {sorted(METRIC_TABLES)}.")
        return table

    def log_training_metrics(
        self, experiment_id: int, method: str, rows: Iterable[Sequence[Any]]
    ) -> int:
        """Append ``(step, name, value)`` rows to the method's metrics table in one transaction.

        Returns:
            The number of rows written.
        """
        table = self.metrics_table(method)
        now, data = utc_now(), []
        for row in rows:
            if len(row) != 3:
                raise ValueError(f"A training-metrics row is (step, name, value), got {row!r}.")
            step, name, value = row
            if not isinstance(name, str) or not name:
                raise ValueError(f"Metric name must be a non-empty string, got {name!r}.")
            if int(step) < 0:
                raise ValueError(f"Metric step must be >= 0, got {step!r} for {name!r}.")
            data.append((experiment_id, int(step), name, as_float(value, f"metric {name!r}"), now))
        with self.transaction():
            self._require_experiment(experiment_id)
            self.conn.executemany(
                f"INSERT INTO {table} (experiment_id, step, name, value, created_at) VALUES (?, ?, ?, ?, ?)", data
            )
        return len(data)

    def truncate_training_metrics(self, experiment_id: int, method: str, after_step: int) -> int:
        """Delete metric rows with ``step > after_step`` (a resumed run re-logs them); returns the count."""
        table = self.metrics_table(method)
        with self.transaction():
            cur = self.conn.execute(
                f"DELETE FROM {table} WHERE experiment_id = ? AND step > ?", (experiment_id, int(after_step))
            )
        return cur.rowcount

    def metrics(self, experiment_id: int, name: Optional[str] = None) -> list[dict[str, Any]]:
        """Per-step metrics of an experiment (from whichever method table holds them), by name then step."""
        out: list[dict[str, Any]] = []
        for table in METRIC_TABLES.values():
            out += self.rows(table, experiment_id=experiment_id, name=name)
        return sorted(out, key=lambda r: (r["name"], r["step"], r["id"]))

    # -- artifacts and data ---------------------------------------------------------------
    def add_artifact(self, experiment_id: int, kind: str, path: Union[str, Path]) -> int:
        """Record a file or folder (adapter, checkpoint, ...) with its size and sha256; returns the row id."""
        size, digest, is_dir = path_digest(path)
        with self.transaction():
            self._require_experiment(experiment_id)
            cur = self.conn.execute(
                "INSERT INTO model_artifacts (experiment_id, kind, path, size_bytes, sha256, is_dir, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, kind, str(Path(path).resolve()), size, digest, int(is_dir), utc_now()),
            )
        return int(cur.lastrowid)

    def artifacts(self, experiment_id: int) -> list[dict[str, Any]]:
        """Artifact rows of an experiment."""
        return self.rows("model_artifacts", experiment_id=experiment_id)

    def add_hidden_states(
        self,
        experiment_id: int,
        model: str,
        path: Union[str, Path],
        *,
        layer: Optional[int] = None,
        pooling: Optional[str] = None,
        shape: Optional[Sequence[int]] = None,
        dtype: Optional[str] = None,
        n_prompts: Optional[int] = None,
    ) -> int:
        """Record an embeddings file (safetensors/npz; the array stays on disk) with size and sha256.

        Args:
            shape: the array shape, e.g. ``[prompts, layers + 1, hidden]``.
        """
        size, digest, _ = path_digest(path)
        with self.transaction():
            self._require_experiment(experiment_id)
            cur = self.conn.execute(
                "INSERT INTO hidden_states (experiment_id, model, layer, pooling, path, shape_json, dtype,"
                " n_prompts, size_bytes, sha256, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, model, layer, pooling, str(Path(path).resolve()),
                 to_json(None if shape is None else [int(s) for s in shape]), dtype, n_prompts, size, digest,
                 utc_now()),
            )
        return int(cur.lastrowid)

    def add_dataset(
        self,
        name: str,
        *,
        split: Optional[str] = None,
        n_rows: Optional[int] = None,
        source: Optional[str] = None,
        sha256: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        experiment_id: Optional[int] = None,
    ) -> int:
        """Record a dataset version/split (hub id or file as ``source``); returns the row id."""
        with self.transaction():
            self._require_experiment(experiment_id, optional=True)
            cur = self.conn.execute(
                "INSERT INTO datasets (experiment_id, name, split, n_rows, source, sha256, metadata_json, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, name, split, n_rows, source, sha256, to_json(metadata), utc_now()),
            )
        return int(cur.lastrowid)

    # -- evaluation rows ------------------------------------------------------------------
    def _insert_rows(self, table: str, experiment_id: Optional[int], rows: Iterable[Mapping[str, Any]],
                     fixed: Optional[Mapping[str, Any]] = None, optional_experiment: bool = False) -> int:
        """Insert validated row dicts (keys from ``_ROW_SPECS``) plus ``fixed`` columns in one transaction."""
        required, optional = _ROW_SPECS[table]
        allowed = set(required) | set(optional)
        now, data, columns = utc_now(), [], None
        for row in rows:
            unknown = set(row) - allowed
            missing = [c for c in required if c not in row]
            if unknown or missing:
                raise ValueError(
                    f"{table} row {dict(row)!r}: unknown keys {sorted(unknown)}, missing {missing}; "
                    f"allowed keys are {sorted(allowed)}."
                )
            values = {**(fixed or {}), **{c: row.get(c) for c in (*required, *optional)}}
            for c in _REAL_COLUMNS & values.keys():
                values[c] = as_float(values[c], f"{table}.{c}")
            if "details" in values:
                values["details_json"] = to_json(values.pop("details"))
            columns = list(values)
            data.append((experiment_id, *values.values(), now))
        if not data:
            return 0
        sql = (f"INSERT INTO {table} (experiment_id, {', '.join(columns)}, created_at)"
               f" VALUES ({', '.join('?' * (len(columns) + 2))})")
        with self.transaction():
            self._require_experiment(experiment_id, optional=optional_experiment)
            self.conn.executemany(sql, data)
        return len(data)

    def add_aqi_scores(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """AQI-family scores, one row per value: keys ``model, metric, value`` and optionally
        ``layer`` (None = pooled), ``pooling, ci_low, ci_high, p_value, n_samples``. Returns the count."""
        return self._insert_rows("aqi_scores", experiment_id, rows)

    def add_behavioral_metrics(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Refusal/G-Eval metrics: keys ``model, metric, value`` and optionally ``category, ci_low,
        ci_high, n_samples``. Returns the count."""
        return self._insert_rows("behavioral_metrics", experiment_id, rows)

    def add_model_responses(self, experiment_id: int, rows: Iterable[Mapping[str, Any]]) -> int:
        """Generated completions: keys ``model, prompt, response`` and optionally ``prompt_id,
        safety_label, axiom, refusal_label, refusal_judge, backend, latency_s, n_tokens``. Returns the count."""
        return self._insert_rows("model_responses", experiment_id, rows)

    def add_comparative_analysis(
        self, analysis: str, rows: Iterable[Mapping[str, Any]], *, experiment_id: Optional[int] = None
    ) -> int:
        """Cells of a comparison named ``analysis``: keys ``subject, metric, value`` and optionally
        ``details`` (JSON). Returns the count."""
        return self._insert_rows("comparative_analysis", experiment_id, rows, fixed={"analysis": analysis},
                                 optional_experiment=True)

    def add_inference_benchmark(
        self,
        backend: str,
        model: str,
        metrics: Mapping[str, Any],
        *,
        experiment_id: Optional[int] = None,
        units: Optional[Mapping[str, str]] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> int:
        """One benchmark of ``model`` on ``backend``: ``metrics`` name -> value (e.g.
        ``tokens_per_s``, ``latency_p50_s``), ``units`` name -> unit. Returns the row count."""
        if not metrics:
            raise ValueError(f"add_inference_benchmark({backend!r}, {model!r}) got no metrics.")
        now, units = utc_now(), dict(units or {})
        data = [(experiment_id, backend, model, name, as_float(v, f"benchmark {name!r}"), units.get(name),
                 to_json(details), now) for name, v in metrics.items()]
        with self.transaction():
            self._require_experiment(experiment_id, optional=True)
            self.conn.executemany(
                "INSERT INTO inference_benchmarks (experiment_id, backend, model, metric, value, unit, details_json,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", data)
        return len(data)

    def add_statistical_test(
        self,
        test: str,
        metric: str,
        *,
        statistic: Optional[float] = None,
        p_value: Optional[float] = None,
        experiment_id: Optional[int] = None,
        group_a: Optional[str] = None,
        group_b: Optional[str] = None,
        p_adjusted: Optional[float] = None,
        correction: Optional[str] = None,
        effect_size: Optional[float] = None,
        effect_size_name: Optional[str] = None,
        ci_low: Optional[float] = None,
        ci_high: Optional[float] = None,
        n: Optional[int] = None,
        details: Optional[Mapping[str, Any]] = None,
    ) -> int:
        """One significance test (``paired_t``, ``bootstrap``, ...) of ``metric`` between ``group_a``
        and ``group_b``; p-values must lie in [0, 1]. Returns the row id."""
        for label, p in (("p_value", p_value), ("p_adjusted", p_adjusted)):
            if p is not None and not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {p!r} for test {test!r} on {metric!r}.")
        with self.transaction():
            self._require_experiment(experiment_id, optional=True)
            cur = self.conn.execute(
                "INSERT INTO statistical_tests (experiment_id, test, metric, group_a, group_b, statistic, p_value,"
                " p_adjusted, correction, effect_size, effect_size_name, ci_low, ci_high, n, details_json,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, test, metric, group_a, group_b, as_float(statistic, "statistic"),
                 as_float(p_value, "p_value"), as_float(p_adjusted, "p_adjusted"), correction,
                 as_float(effect_size, "effect_size"), effect_size_name, as_float(ci_low, "ci_low"),
                 as_float(ci_high, "ci_high"), n, to_json(details), utc_now()),
            )
        return int(cur.lastrowid)

    def add_cost_analysis(
        self,
        item: str,
        *,
        gpu_hours: Optional[float] = None,
        price_per_hour: Optional[float] = None,
        cost: Optional[float] = None,
        currency: str = "USD",
        details: Optional[Mapping[str, Any]] = None,
        experiment_id: Optional[int] = None,
    ) -> int:
        """A cost line; ``cost`` defaults to ``gpu_hours * price_per_hour``. Returns the row id."""
        if cost is None and gpu_hours is not None and price_per_hour is not None:
            cost = float(gpu_hours) * float(price_per_hour)
        with self.transaction():
            self._require_experiment(experiment_id, optional=True)
            cur = self.conn.execute(
                "INSERT INTO cost_analysis (experiment_id, item, gpu_hours, price_per_hour, cost, currency,"
                " details_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (experiment_id, item, as_float(gpu_hours, "gpu_hours"), as_float(price_per_hour, "price_per_hour"),
                 as_float(cost, "cost"), currency, to_json(details), utc_now()),
            )
        return int(cur.lastrowid)

    def add_recommendation(
        self, use_case: str, recommendation: str, *, confidence: Optional[float] = None,
        evidence: Optional[Any] = None,
    ) -> int:
        """A recommendation for a use case with a confidence in [0, 1] and its evidence (JSON)."""
        if confidence is not None and not 0.0 <= float(confidence) <= 1.0:
            raise ValueError(f"Recommendation confidence must lie in [0, 1], got {confidence!r}.")
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO recommendations (use_case, recommendation, confidence, evidence_json, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (use_case, recommendation, as_float(confidence, "confidence"), to_json(evidence), utc_now()),
            )
        return int(cur.lastrowid)

    def add_environment(self, manifest: Mapping[str, Any]) -> int:
        """Store an environment manifest from :func:`fteval.envinfo.collect_manifest`; returns the row id."""
        gpus = manifest.get("hardware", {}).get("gpus") or []
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO environment (hostname, python, torch, cuda_available, gpu_names, hf_token_present,"
                " manifest_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (manifest.get("hostname"), manifest.get("python"), manifest.get("packages", {}).get("torch"),
                 int(bool(manifest.get("hardware", {}).get("cuda_available"))),
                 ", ".join(g.get("name", "?") for g in gpus) or None,
                 int(bool(manifest.get("hf_token_present"))), to_json(manifest), utc_now()),
            )
        return int(cur.lastrowid)

    # -- generic query --------------------------------------------------------------------
    def columns(self, table: str) -> list[str]:
        """Column names of one of the schema's tables."""
        if table not in TABLES:
            raise ValueError(f"Unknown table {table!r}; tables are {', '.join(TABLES)}.")
        return [r["name"] for r in self.conn.execute(f"PRAGMA table_info({table})")]

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        """Rows of ``table`` matching ``column=value`` filters (None filters are ignored), by id.

        ``*_json`` columns come back decoded under the name without the suffix.
        """
        cols = self.columns(table)
        filters = {k: v for k, v in where.items() if v is not None}
        unknown = set(filters) - set(cols)
        if unknown:
            raise ValueError(f"Unknown column(s) {sorted(unknown)} for table {table}; columns are {cols}.")
        sql = f"SELECT * FROM {table}"
        if filters:
            sql += " WHERE " + " AND ".join(f"{k} = ?" for k in filters)
        order = "version" if table == "schema_version" else "id"
        out = []
        for r in self.conn.execute(f"{sql} ORDER BY {order}", tuple(filters.values())):
            d = dict(r)
            for k in [k for k in d if k.endswith("_json")]:
                raw = d.pop(k)
                d[k[: -len("_json")]] = None if raw is None else json.loads(raw)
            out.append(d)
        return out
