"""The experiment database: schema, migrations, integrity under concurrency and failure, export."""

from __future__ import annotations

import os
import csv
import hashlib
import json
import math
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from fteval.db import TABLES, DatabaseFileError, ExperimentDB, export, path_digest
from fteval.db.schema import LATEST_VERSION, MIGRATIONS, SCHEMA_VERSION_DDL



def _version(db) -> int:
    """The schema version a database is at (its highest ``schema_version`` row)."""
    return max(r["version"] for r in db.rows("schema_version"))

def _count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- schema and migrations -----------------------------------------------------------------------
def test_schema_created_with_settings(tmp_path):
    assert [m.version for m in MIGRATIONS] == list(range(1, LATEST_VERSION + 1))
    db = ExperimentDB(tmp_path / "sub" / "c.db")
    tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= tables
    assert _version(db) == LATEST_VERSION == 5
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert db.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 60_000
    assert db.backup_path is None
    # foreign keys are enforced: a metric row for a missing experiment is refused by SQLite itself
    with pytest.raises(sqlite3.IntegrityError):
        with db.transaction():
            db.conn.execute("INSERT INTO training_metrics (experiment_id, method, step, name, value, created_at)"
                            " VALUES (99, 'qlora', 1, 'loss', 1.0, 'now')")
    db.close()
    # reopening applies nothing and writes no backup
    again = ExperimentDB(tmp_path / "sub" / "c.db")
    assert _version(again) == 5 and again.backup_path is None
    assert len(again.rows("schema_version")) == 5
    again.close()


def _old_database(path: Path, version: int) -> None:
    """A database at ``version`` built with that version's own DDL (the migrations up to it)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute(SCHEMA_VERSION_DDL)
    for m in MIGRATIONS[:version]:
        for statement in m.statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?, ?, '2025-01-01')", (m.version, m.description))
    conn.execute("COMMIT")
    conn.close()


def test_migration_v4_to_v5_moves_per_method_tables_into_one(tmp_path):
    path = tmp_path / "v4.db"
    _old_database(path, 4)
    conn = sqlite3.connect(path, isolation_level=None)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"training_metrics_qlora", "training_metrics_grit"} <= tables and "training_metrics" not in tables
    conn.execute("BEGIN")
    for name, method in (("q", "qlora"), ("g", "grit"), ("x", "QLoRAModule")):  # the last: a class-named run
        conn.execute("INSERT INTO experiments (name, method, started_at) VALUES (?, ?, 't0')", (name, method))
    old = {1: ("qlora", [(1, "loss", 3.0), (2, "loss", 2.5), (2, "lr", 1e-4)]),
           2: ("grit", [(1, "loss", 2.9), (1, "grit/kfac_refreshes", 1.0)]),
           3: ("qlora", [(5, "loss", 1.25)])}
    for exp, (table, rows) in old.items():
        conn.executemany(f"INSERT INTO training_metrics_{table} (experiment_id, step, name, value, created_at)"
                         " VALUES (?, ?, ?, ?, 't')", [(exp, *r) for r in rows])
    conn.execute("COMMIT")
    conn.close()

    with ExperimentDB(path) as db:
        assert _version(db) == 5 and db.backup_path == tmp_path / "v4.db.bak-v4"
        names = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "training_metrics_qlora" not in names and "training_metrics_grit" not in names
        for exp, (_, rows) in old.items():
            got = [(m["step"], m["name"], m["value"]) for m in db.metrics(exp)]
            assert got == sorted(rows, key=lambda r: (r[1], r[0]))
        by_exp = {r["experiment_id"]: r["method"] for r in db.rows("training_metrics")}
        assert by_exp == {1: "qlora", 2: "grit", 3: "QLoRAModule"}  # the experiment's own method
        assert len(db.rows("training_metrics")) == 6
        # new rows of the migrated database go to the same table and extend a run's curve
        db.log_training_metrics(1, "qlora", [(3, "loss", 2.0)])
        assert [m["value"] for m in db.metrics(1, name="loss")] == [3.0, 2.5, 2.0]
    bak = sqlite3.connect(tmp_path / "v4.db.bak-v4")  # the backup still reads as version 4
    assert bak.execute("SELECT COUNT(*) FROM training_metrics_grit").fetchone()[0] == 2
    bak.close()


def test_migration_from_v1_writes_backup_and_keeps_rows(tmp_path):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute(SCHEMA_VERSION_DDL)
    for statement in MIGRATIONS[0].statements:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1, 'v1', '2025-01-01')")
    conn.execute("INSERT INTO experiments (name, method, config_json, started_at) VALUES ('r1', 'qlora', '{\"lr\": 0.001}', 't0')")
    conn.executemany("INSERT INTO training_metrics_qlora (experiment_id, step, name, value, created_at)"
                     " VALUES (1, ?, 'loss', ?, 't')", [(s, 3.0 - 0.5 * s) for s in range(1, 5)])
    conn.execute("COMMIT")
    conn.close()
    v1_bytes = path.read_bytes()

    db = ExperimentDB(path)
    assert _version(db) == 5
    assert db.backup_path == tmp_path / "old.db.bak-v1"
    # the migrated database kept the rows and gained the v2 column (default 'fit') and table
    exp = db.experiment(1)
    assert (exp["name"], exp["method"], exp["stage"], exp["config"]) == ("r1", "qlora", "fit", {"lr": 0.001})
    assert [m["value"] for m in db.metrics(1)] == [2.5, 2.0, 1.5, 1.0]
    assert "stage" in db.columns("experiments") and db.rows("environment") == []
    db.close()
    # the backup is the v1 database, readable, with its data and without the v2 changes
    bak = sqlite3.connect(db.backup_path)
    assert bak.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == 1
    assert "stage" not in [r[1] for r in bak.execute("PRAGMA table_info(experiments)")]
    assert bak.execute("SELECT COUNT(*) FROM training_metrics_qlora").fetchone()[0] == 4
    bak.close()
    assert len(v1_bytes) > 0
    # a second migration of another v1 file next to an existing backup does not overwrite it
    before = db.backup_path.read_bytes()
    path.unlink()
    path.write_bytes(v1_bytes)
    db2 = ExperimentDB(path)
    assert db2.backup_path != db.backup_path and db2.backup_path.name.startswith("old.db.bak-v1-")
    assert db.backup_path.read_bytes() == before
    db2.close()


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "new.db"
    ExperimentDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (99, 'from the future', 'x')")
    conn.commit()
    conn.close()
    before = _snapshot(tmp_path)
    with pytest.raises(DatabaseFileError, match="schema version 99, newer"):
        ExperimentDB(path)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["text", "foreign", "corrupt", "truncated"])
def test_foreign_and_corrupt_files_raise_and_stay_untouched(tmp_path, kind):
    path = tmp_path / "centralized.db"
    if kind == "text":
        path.write_text("name,value\nloss,1.0\n")
    elif kind == "foreign":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT)")
        conn.execute("INSERT INTO users (email) VALUES ('a@b.c')")
        conn.commit()
        conn.close()
    elif kind == "corrupt":  # a valid header followed by garbage pages
        path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 64)
    else:  # a real database cut short
        ExperimentDB(tmp_path / "whole.db").close()
        path.write_bytes((tmp_path / "whole.db").read_bytes()[:1500])
        (tmp_path / "whole.db").unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(DatabaseFileError, match="untouched") as info:
        ExperimentDB(path)
    assert str(path) in str(info.value)
    assert _snapshot(tmp_path) == before  # same bytes, and no -wal/-shm/backup files appeared
    with pytest.raises(DatabaseFileError):
        export(path, tmp_path / "out")
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_directory_path_is_refused(tmp_path):
    with pytest.raises(DatabaseFileError, match="directory"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "x").write_text("x")
        ExperimentDB(tmp_path / "d")


# -- integrity -----------------------------------------------------------------------------------
def _writer(path: str, worker: int, n_rows: int) -> None:
    db = ExperimentDB(path)
    exp = db.create_experiment(f"worker-{worker}", "qlora", {"worker": worker}, seed=worker)
    for step in range(n_rows):  # one transaction per row: 500 lock acquisitions per process
        db.log_training_metrics(exp, "qlora", [(step, "loss", worker + step / n_rows)])
    db.finish_experiment(exp)
    db.close()


def test_four_processes_write_concurrently_without_losing_rows(tmp_path):
    path, n_proc, n_rows = tmp_path / "c.db", 4, 500
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, n_rows)) for w in range(n_proc)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * n_proc
    db = ExperimentDB(path)
    exps = db.experiments()
    assert sorted(e["name"] for e in exps) == [f"worker-{w}" for w in range(n_proc)]
    assert all(e["status"] == "finished" for e in exps)
    assert _count(path, "training_metrics") == n_proc * n_rows
    for e in exps:
        rows = db.metrics(e["id"])
        w = e["seed"]
        assert [r["step"] for r in rows] == list(range(n_rows))
        assert [r["value"] for r in rows] == pytest.approx([w + s / n_rows for s in range(n_rows)])
    assert _version(db) == 5 and len(db.rows("schema_version")) == 5  # migrated once, not five times
    db.close()


def test_exception_inside_transaction_leaves_nothing(tmp_path):
    db = ExperimentDB(tmp_path / "c.db")
    with pytest.raises(RuntimeError, match="crash"):
        with db.transaction():
            exp = db.create_experiment("half", "grit", {"a": 1})
            db.log_training_metrics(exp, "grit", [(s, "loss", 1.0) for s in range(100)])
            db.add_aqi_scores(exp, [{"model": "grit", "metric": "aqi", "value": 0.5}])
            raise RuntimeError("crash in the middle of a write")
    for table in ("experiments", "training_metrics", "aqi_scores"):
        assert _count(db.path, table) == 0
    # a failing inner block rolls back alone when the caller handles it
    with db.transaction():
        exp = db.create_experiment("kept", "grit")
        with pytest.raises(ValueError):
            with db.transaction():
                db.log_training_metrics(exp, "grit", [(1, "loss", 2.0)])
                db.add_statistical_test("paired_t", "aqi", p_value=1.5)  # invalid: p > 1
    assert [e["name"] for e in db.experiments()] == ["kept"]
    assert db.metrics(exp) == []
    # a helper that fails validation half-way through its rows writes none of them
    with pytest.raises(ValueError, match="unknown keys"):
        db.add_behavioral_metrics(exp, [{"model": "m", "metric": "refusal_rate", "value": 0.1},
                                        {"model": "m", "metric": "x", "value": 1, "typo": 2}])
    assert _count(db.path, "behavioral_metrics") == 0
    db.close()


# -- helpers ---------------------------------------------------------------------------------------
def test_insert_helpers_and_queries(tmp_path):
    db = ExperimentDB(tmp_path / "c.db")
    exp = db.create_experiment(None, "qlora", {"model": {"lr": 2e-4}, "hf_token": "hf_" + "a" * 34},
                               seed=42, git_commit="abc", packages={"torch": "2.13"}, hardware={"gpus": []})
    row = db.experiment(exp)
    assert row["name"].startswith("qlora-fit-") and row["status"] == "running" and row["seed"] == 42
    assert row["config"] == {"model": {"lr": 2e-4}, "hf_token": "<redacted>"}
    assert db.log_training_metrics(exp, "QLoRA", [(1, "loss", 2.0), (1, "lr", 1e-4), (2, "loss", float("nan"))]) == 3
    assert [(m["step"], m["name"], m["value"]) for m in db.metrics(exp)] == [(1, "loss", 2.0), (2, "loss", None),
                                                                             (1, "lr", 1e-4)]
    assert {m["method"] for m in db.rows("training_metrics", experiment_id=exp)} == {"qlora"}  # the run's own name
    assert db.truncate_training_metrics(exp, after_step=1) == 1
    with pytest.raises(ValueError, match="is a 'qlora' run, not 'grit'"):  # never filed as another method's
        db.log_training_metrics(exp, "grit", [(1, "loss", 1.0)])
    other = db.create_experiment("sft-run", "sft")  # any method, registered or not, has its rows in the one table
    assert db.log_training_metrics(other, None, [(1, "loss", 1.0)]) == 1
    assert [(m["method"], m["value"]) for m in db.rows("training_metrics", experiment_id=other)] == [("sft", 1.0)]
    with pytest.raises(ValueError, match="No experiment with id 999"):
        db.log_training_metrics(999, "qlora", [(1, "loss", 1.0)])
    with pytest.raises(ValueError, match="status"):
        db.finish_experiment(exp, "done")

    f = tmp_path / "adapter" / "adapter_model.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"\x01\x02" * 1000)
    (f.parent / "adapter_config.json").write_text("{}")
    aid = db.add_artifact(exp, "adapter_file", f)
    art = db.artifacts(exp)[0]
    assert art["id"] == aid and art["size_bytes"] == 2000
    assert art["sha256"] == hashlib.sha256(b"\x01\x02" * 1000).hexdigest()
    size, digest, is_dir = path_digest(f.parent)
    assert (size, is_dir) == (2002, True)
    (f.parent / "adapter_config.json").write_text("{ }")
    assert path_digest(f.parent)[1] != digest
    with pytest.raises(FileNotFoundError, match="does not exist"):
        db.add_artifact(exp, "adapter", tmp_path / "missing")

    assert db.add_aqi_scores(exp, [{"model": "qlora", "metric": "delta_aqi", "value": 0.12, "ci_low": 0.01,
                                    "ci_high": 0.2, "p_value": 0.03, "n_samples": 128, "layer": None}]) == 1
    assert db.rows("aqi_scores", experiment_id=exp)[0]["ci_high"] == 0.2
    assert db.add_model_responses(exp, [{"model": "base", "prompt": "p, \"q\"\nr", "response": "é",
                                         "safety_label": "unsafe", "latency_s": 0.5}]) == 1
    hs = tmp_path / "h.npz"
    hs.write_bytes(b"0" * 10)
    db.add_hidden_states(exp, "base", hs, shape=[16, 31, 576], dtype="float32", n_prompts=16)
    assert db.rows("hidden_states")[0]["shape"] == [16, 31, 576]
    assert db.add_inference_benchmark("hf", "smollm2", {"tokens_per_s": 95.5, "latency_p50_s": 0.2},
                                      units={"tokens_per_s": "tok/s"}) == 2
    assert [r["unit"] for r in db.rows("inference_benchmarks")] == ["tok/s", None]
    db.add_statistical_test("paired_t", "aqi", statistic=2.1, p_value=0.04, group_a="base", group_b="qlora",
                            effect_size=0.3, effect_size_name="cohens_d", n=64)
    db.add_dataset("alignment-instructions", split="train", n_rows=900, source="sample", experiment_id=exp)
    assert db.add_comparative_analysis("qlora_vs_grit", [{"subject": "grit", "metric": "final_loss",
                                                          "value": 1.2}]) == 1
    assert db.rows("comparative_analysis")[0]["analysis"] == "qlora_vs_grit"
    db.add_cost_analysis("training", gpu_hours=2.0, price_per_hour=3.5)
    assert db.rows("cost_analysis")[0]["cost"] == 7.0
    db.add_recommendation("safety-critical", "grit", confidence=0.7, evidence={"delta_aqi": 0.12})
    with pytest.raises(ValueError, match="confidence"):
        db.add_recommendation("x", "y", confidence=2)
    with pytest.raises(ValueError, match="Unknown table"):
        db.rows("sqlite_master")
    with pytest.raises(ValueError, match="Unknown column"):
        db.rows("experiments", methd="qlora")
    db.finish_experiment(exp, "failed", error="boom")
    assert db.experiments(status="failed")[0]["error"] == "boom"
    assert db.experiments(method="grit") == []
    db.close()
    with pytest.raises(RuntimeError, match="closed"):
        db.experiments()


# -- export --------------------------------------------------------------------------------------
def test_export_round_trips(tmp_path, capsys):
    path = tmp_path / "c.db"
    with ExperimentDB(path) as db:
        exp = db.create_experiment("run", "grit", {"x": [1, 2]}, seed=1)
        db.log_training_metrics(exp, "grit", [(s, "loss", math.pi / s) for s in range(1, 6)])
        db.add_model_responses(exp, [{"model": "base", "prompt": 'a, "quoted"\nline', "response": "ünï ✓",
                                      "n_tokens": 7}])
        db.add_statistical_test("bootstrap", "delta_aqi", p_value=1e-12, ci_low=-0.1, ci_high=0.3)
    out = tmp_path / "export"
    export(path, out, ["csv", "json", "parquet"])
    assert "training_metrics" in capsys.readouterr().out

    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert set(TABLES) <= set(tables)
    for table in tables:
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
        cols = [d[0] for d in cur.description]
        rows = [dict(r) for r in cur.fetchall()]
        assert json.loads((out / f"{table}.json").read_text(encoding="utf-8")) == rows
        with open(out / f"{table}.csv", newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            assert next(reader) == cols
            assert list(reader) == [["" if r[c] is None else str(r[c]) for c in cols] for r in rows]
        pq = pytest.importorskip("pyarrow.parquet")
        back = pq.read_table(out / f"{table}.parquet")
        assert back.column_names == cols and back.to_pylist() == rows
    conn.close()
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert [m["value"] for m in metrics] == [math.pi / s for s in range(1, 6)]  # floats exact through JSON
    assert not list(out.glob(".*"))  # no temporary files left


def test_export_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No database"):
        export(tmp_path / "none.db", tmp_path / "out")
    assert not (tmp_path / "none.db").exists() and not (tmp_path / "out").exists()
    ExperimentDB(tmp_path / "c.db").close()
    with pytest.raises(ValueError, match="Unknown export format"):
        export(tmp_path / "c.db", tmp_path / "out", ["xlsx"])


def test_runs_whose_process_died_are_marked_crashed_by_the_next_start(tmp_path):
    import socket
    import subprocess
    import sys

    db = ExperimentDB(tmp_path / "c.db")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited
    dead = db.create_experiment("killed", "qlora")
    alive = db.create_experiment("this process", "grit")
    far = db.create_experiment("other host", "grit")
    quiet = db.create_experiment("other host, silent", "grit")
    with db.transaction():
        db.conn.execute("UPDATE experiments SET pid = ? WHERE id = ?", (dead_pid, dead))
        db.conn.execute("UPDATE experiments SET host = 'elsewhere' WHERE id IN (?, ?)", (far, quiet))
        db.conn.execute("UPDATE experiments SET heartbeat_at = '2020-01-01T00:00:00.000+00:00' WHERE id = ?", (quiet,))
    assert db.mark_dead_runs() == [dead, quiet]
    status = {e["id"]: e["status"] for e in db.experiments()}
    assert status == {dead: "crashed", alive: "running", far: "running", quiet: "crashed"}
    assert "ended without recording a status" in db.experiment(dead)["error"]
    db.finish_experiment(dead, "running")  # a resume claims the row for this process
    row = db.experiment(dead)
    assert (row["status"], row["pid"], row["host"]) == ("running", os.getpid(), socket.gethostname())
    db.create_experiment("next", "qlora")  # every new run checks
    assert db.experiment(quiet)["status"] == "crashed" and db.experiment(alive)["status"] == "running"
