"""Fixtures of the compare/report tests: the replayed tiny-run database (see ``tiny_run.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.analysis.tiny_run import RUN_FILE, build_database


@pytest.fixture(scope="session")
def recorded_db(tmp_path_factory) -> Path:
    """The replayed database (session-wide, never written by tests: use ``run_db``)."""
    return build_database(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture()
def run_db(recorded_db, tmp_path) -> Path:
    """A private copy of the replayed database for one test (compare/report write rows into it)."""
    target = tmp_path / "db" / "centralized.db"
    target.parent.mkdir()
    shutil.copyfile(recorded_db, target)
    return target


@pytest.fixture()
def recorded() -> dict:
    """The recorded run as loaded from tiny_run.json (expected values for the assertions)."""
    return json.loads(RUN_FILE.read_text())
