"""`ExperimentDB`: the one small data layer every stage writes through.

Not an ORM: typed insert helpers that validate their input and run parameterised SQL,
each inside one transaction, and query helpers that return plain dicts. This file holds the
connection, transactions, experiments, training metrics and queries; the helpers that record
artifacts, datasets, evaluation rows, tests, benchmarks and costs are in :mod:`fteval.db.records`. Table names are
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
from fteval.db.records import RecordWriters
from fteval.db.schema import METRICS_TABLE, TABLES
from fteval.db.values import as_float, redact_secrets, to_json

__all__ = ["ExperimentDB", "STATUSES"]

STATUSES = ("running", "finished", "failed", "interrupted", "crashed")

# A 'running' row of another host whose heartbeat is older than this is taken for dead (seconds).
STALE_HEARTBEAT_S = 6 * 3600

class ExperimentDB(RecordWriters):
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
        return self._insert("experiments", {
            "name": name, "method": method, "stage": stage, "status": "running", "config_json": to_json(config),
            "seed": None if seed is None else int(seed), "git_commit": git_commit, "packages_json": to_json(packages),
            "hardware_json": to_json(hardware), "started_at": started, "pid": os.getpid(), "host": socket.gethostname(),
            "heartbeat_at": started})

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

    def _insert(self, table: str, values: Mapping[str, Any], experiment: str = "none") -> int:
        """Insert one row (column -> value) in one transaction; returns its id.

        ``experiment``: 'required' or 'optional' first checks that ``values["experiment_id"]`` names an
        experiment (None allowed with 'optional'); 'none' checks nothing. ``table`` and the column
        names come from this package's code, never from a caller.
        """
        columns = ", ".join(values)
        with self.transaction():
            if experiment != "none":
                self._require_experiment(values["experiment_id"], optional=experiment == "optional")
            cur = self.conn.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(values))})",
                                    tuple(values.values()))
        return int(cur.lastrowid)

    def _require_experiment(self, experiment_id: Optional[int], optional: bool = False) -> Optional[int]:
        if experiment_id is None and optional:
            return None
        if not isinstance(experiment_id, int) or isinstance(experiment_id, bool):
            raise ValueError(f"experiment_id must be an int (from create_experiment), got {experiment_id!r}.")
        if self.conn.execute("SELECT 1 FROM experiments WHERE id = ?", (experiment_id,)).fetchone() is None:
            raise ValueError(f"No experiment with id {experiment_id} in {self.path}; create it first.")
        return experiment_id

    # -- training metrics -----------------------------------------------------------------
    def _experiment_method(self, experiment_id: int, method: Optional[str]) -> str:
        """The experiment's recorded method; ``method``, when given, must name the same one."""
        self._require_experiment(experiment_id)
        recorded = self.conn.execute("SELECT method FROM experiments WHERE id = ?", (experiment_id,)).fetchone()[0]
        if method is not None and str(method).strip().lower() != str(recorded).lower():
            raise ValueError(f"Experiment {experiment_id} is a {recorded!r} run, not {method!r}; its metrics are "
                             f"recorded under its own method (pass method=None).")
        return str(recorded)

    def log_training_metrics(
        self, experiment_id: int, method: Optional[str], rows: Iterable[Sequence[Any]]
    ) -> int:
        """Append ``(step, name, value)`` rows to ``training_metrics`` in one transaction.

        Every row is stored under the experiment's own method (its ``experiments.method``); ``method``
        may be None, or must name that method (a check against writing one run's metrics as another's).

        Returns:
            The number of rows written.
        """
        now, data = utc_now(), []
        for row in rows:
            if len(row) != 3:
                raise ValueError(f"A training-metrics row is (step, name, value), got {row!r}.")
            step, name, value = row
            if not isinstance(name, str) or not name:
                raise ValueError(f"Metric name must be a non-empty string, got {name!r}.")
            if int(step) < 0:
                raise ValueError(f"Metric step must be >= 0, got {step!r} for {name!r}.")
            data.append((int(step), name, as_float(value, f"metric {name!r}"), now))
        with self.transaction():
            recorded = self._experiment_method(experiment_id, method)
            self.conn.executemany(
                f"INSERT INTO {METRICS_TABLE} (experiment_id, method, step, name, value, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", [(experiment_id, recorded, *d) for d in data])
        return len(data)

    def truncate_training_metrics(self, experiment_id: int, after_step: int) -> int:
        """Delete metric rows with ``step > after_step`` (a resumed run re-logs them); returns the count."""
        with self.transaction():
            cur = self.conn.execute(
                f"DELETE FROM {METRICS_TABLE} WHERE experiment_id = ? AND step > ?", (experiment_id, int(after_step))
            )
        return cur.rowcount

    def metrics(self, experiment_id: int, name: Optional[str] = None) -> list[dict[str, Any]]:
        """Per-step metrics of an experiment, by name then step."""
        out = self.rows(METRICS_TABLE, experiment_id=experiment_id, name=name)
        return sorted(out, key=lambda r: (r["name"], r["step"], r["id"]))

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
