"""Backend tests: torch runs single-threaded here.

Generation on the 135M embedded model is latency-bound; on a small shared CPU machine two
OpenMP threads competing with other processes made it 10x slower than one (measured: 3 prompts
x 8 tokens, 15 s with 2 threads vs 1.4 s with 1 under load), so each module pins one thread
and restores the previous setting afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
