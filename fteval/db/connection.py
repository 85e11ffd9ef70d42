"""Opening the database file safely: validation, connection settings, migrations.

Everything here runs before a single byte of an existing file is changed:

1. a non-empty file must start with SQLite's 16-byte magic header, else it is not ours;
2. it is opened read-only (``mode=ro``) and inspected: a database with tables but no
   ``schema_version`` is some other program's (foreign), a ``schema_version`` above
   :data:`LATEST_VERSION` comes from a newer fteval, and a file SQLite cannot read is
   corrupt. Each of these raises :class:`DatabaseFileError` and the file stays as it was.

Only then is it opened read-write: WAL journal, foreign keys on, a busy timeout so
concurrent writers wait instead of failing, and the pending migrations applied in one
``BEGIN IMMEDIATE`` transaction after a backup copy ``<name>.bak-v<old>`` is written.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from fteval.db.schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_DDL
from fteval.io import write_atomic

__all__ = ["DatabaseFileError", "SQLITE_MAGIC", "inspect_file", "open_readonly", "open_and_migrate", "utc_now"]

SQLITE_MAGIC = b"SQLite format 3\x00"  # first 16 bytes of every SQLite 3 database file
BUSY_TIMEOUT_MS = 60_000  # writers wait up to 60 s for the write lock before failing


class DatabaseFileError(ValueError):
    """The file at the database path is not a usable fteval database (nothing was changed)."""


def utc_now() -> str:
    """Current time as an ISO-8601 UTC string with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open ``path`` read-only without creating or changing any file; rows are ``sqlite3.Row``.

    Without a ``-wal`` file beside it nobody is writing, and the file is opened as immutable
    (a read-only open of a WAL database would otherwise create ``-wal``/``-shm`` files next to
    it); with one, it is opened ``mode=ro`` so the WAL's committed content is seen.
    """
    live = path.with_name(path.name + "-wal").exists()
    query = "mode=ro" if live else "mode=ro&immutable=1"
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{query}", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    return conn


def inspect_file(path: Path) -> Optional[int]:
    """Schema version of the database at ``path``; None when it is absent, empty or has no tables.

    Raises:
        DatabaseFileError: not an SQLite file, a corrupt one, a foreign database, or a
            schema newer than this fteval knows. The file is only read.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    if path.is_dir():
        raise DatabaseFileError(f"Database path {path} is a directory; pass a file path such as {path}/centralized.db.")
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise DatabaseFileError(
            f"{path} is not an SQLite database (its first bytes are {head[:16]!r}); it was left untouched. "
            "Pass another --db_path, or move that file away."
        )
    try:
        conn = open_readonly(path)
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return None
            if "schema_version" not in tables:
                raise DatabaseFileError(
                    f"{path} is an SQLite database of another program (tables: {', '.join(sorted(tables)[:8])}; "
                    "no fteval schema_version table); it was left untouched. Pass another --db_path."
                )
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as err:  # "file is not a database", "malformed", ...
        raise DatabaseFileError(
            f"{path} is a corrupt SQLite database ({err}); it was left untouched. "
            f"Restore it from a backup (e.g. {path.name}.bak-v*) or pass another --db_path."
        ) from err
    if version is None:
        return None
    if version > LATEST_VERSION:
        raise DatabaseFileError(
            f"{path} has schema version {version}, newer than this fteval understands ({LATEST_VERSION}); "
            "it was left untouched. Upgrade fteval, or pass another --db_path."
        )
    return int(version)


def _backup(conn: sqlite3.Connection, path: Path, version: int) -> Path:
    """Copy the database (WAL content included) to ``<name>.bak-v<version>`` atomically."""
    target = path.with_name(f"{path.name}.bak-v{version}")
    if target.exists():  # an earlier backup of the same version is kept as it is
        target = path.with_name(f"{path.name}.bak-v{version}-{datetime.now():%Y%m%d-%H%M%S-%f}")

    def copy(tmp: Path) -> None:
        dst = sqlite3.connect(tmp)
        try:
            conn.backup(dst)
        finally:
            dst.close()

    return write_atomic(target, copy)


def _current_version(conn: sqlite3.Connection) -> int:
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
    ).fetchone()
    if not has_table:
        return 0
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])


def _retry_locked(fn, attempts: int = 200):
    """Run ``fn`` again while SQLite says the database is locked (pragmas that skip the busy handler)."""
    for i in range(attempts):
        try:
            return fn()
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or i == attempts - 1:
                raise
            time.sleep(0.05)


def open_and_migrate(path: Path) -> tuple[sqlite3.Connection, Optional[Path]]:
    """Validate, open read-write and bring the schema to :data:`LATEST_VERSION`.

    Returns:
        The connection (autocommit mode: transactions are explicit ``BEGIN``/``COMMIT``) and
        the backup path when an older schema was migrated, else None.
    """
    on_disk = inspect_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = _retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        if str(mode).lower() != "wal":
            raise DatabaseFileError(f"{path}: SQLite refused WAL journal mode (got {mode!r}); use a local file system.")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across app crashes
        backup = None
        if on_disk is not None and on_disk < LATEST_VERSION:
            backup = _backup(conn, path, on_disk)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(SCHEMA_VERSION_DDL)
            version = _current_version(conn)  # re-read under the write lock: another process may have migrated
            if version == 0:
                others = [
                    r[0]
                    for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                    if r[0] != "schema_version" and not r[0].startswith("sqlite_")
                ]
                if others:
                    raise DatabaseFileError(f"{path} holds another program's tables ({', '.join(others[:8])}).")
            if version > LATEST_VERSION:
                raise DatabaseFileError(f"{path} has schema version {version}, newer than {LATEST_VERSION}.")
            for migration in MIGRATIONS:
                if migration.version <= version:
                    continue
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.description, utc_now()),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except BaseException:
        conn.close()
        raise
    return conn, backup
