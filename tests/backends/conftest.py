"""Backend tests: torch runs single-threaded here.

Generation on the 135M embedded model is latency-bound; on a small shared CPU machine two
OpenMP threads competing with other processes made it 10x slower than one (measured: 3 prompts
x 8 tokens, 15 s with 2 threads vs 1.4 s with 1 under load), so each module pins one thread
and restores the previous setting afterwards.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread_for_backends(one_thread):
    """Every backend test runs with the shared ``one_thread`` fixture (tests/conftest.py)."""
    yield
