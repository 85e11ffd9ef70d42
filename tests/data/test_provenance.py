"""Data provenance: every processed split is described (source, sha256, rows) and traceable to its source rows."""

import hashlib
import json

import lightning as L

from tests.conftest import accd_rows, alignment_rows, write_jsonl
from tests.data.test_datamodule import make_dm


def test_provenance_and_processed_files_trace_each_row_to_its_source(tmp_path):
    train = alignment_rows(30) + [alignment_rows(1)[0]]  # an exact duplicate of row 0, removed
    files = {"train": write_jsonl(tmp_path / "t.jsonl", train), "eval": write_jsonl(tmp_path / "e.jsonl", accd_rows())}
    dm = make_dm(files, tmp_path)
    dm.setup(None)
    dm.train_dataloader()  # writes statistics and the processed files
    by = {(p["name"], p["split"]): p for p in dm.provenance}
    assert set(by) == {("alignment-instructions", "train"), ("alignment-instructions", "validation"), ("accd", "evaluation")}
    tr = by[("alignment-instructions", "train")]
    assert tr["sha256"] == hashlib.sha256(files["train"].read_bytes()).hexdigest()
    assert tr["n_rows"] == len(dm.train_set) and tr["metadata"]["exact_duplicates_removed"] == 1
    processed = tmp_path / "stats" / tr["metadata"]["processed_file"]
    rows = [json.loads(line) for line in processed.read_text().splitlines()]
    assert len(rows) == tr["n_rows"] and hashlib.sha256(processed.read_bytes()).hexdigest() == tr["metadata"]["content_sha256"]
    for r in rows:  # each processed row is its source row
        assert train[r["source_row"]]["Prompt"] == r["prompt"] and r["source_row"] != 30
    ev = by[("accd", "evaluation")]
    src = accd_rows()
    for rec in dm.eval_records:
        assert src[rec["source_row"]]["input"] == rec["prompt"]
    assert ev["n_rows"] == len(dm.eval_records) == 40
    again = make_dm(files, tmp_path)
    again.setup(None)
    assert [p["metadata"]["content_sha256"] for p in again.provenance] == [p["metadata"]["content_sha256"] for p in dm.provenance]


def test_fit_records_its_datasets_in_the_database(data_files, tmp_path):
    from callbacks.run_logger import ExperimentDBLogger
    from fteval.db import ExperimentDB
    from tests.callbacks.test_run_logger import TinyModule, loader

    dm = make_dm(data_files, tmp_path)
    dm.setup("fit")
    cb = ExperimentDBLogger(db_path=tmp_path / "c.db")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, callbacks=[cb],
                        enable_progress_bar=False, limit_val_batches=0)
    trainer.datamodule = dm  # the module trains on its own loader; the data module describes the data
    trainer.fit(TinyModule(), loader())
    with ExperimentDB(tmp_path / "c.db") as db:
        rows = db.rows("datasets", experiment_id=cb.experiment_id)
    assert sorted((r["name"], r["split"]) for r in rows) == [("alignment-instructions", "train"),
                                                              ("alignment-instructions", "validation")]
    assert all(r["sha256"] and r["n_rows"] > 0 for r in rows)
