"""Shared fixtures: the embedded model's tokenizer, small data files in both schemas."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

AXIOMS = [
    "Civility & Tolerance", "Duty & Accountability", "Empathy & Helpfulness", "Information Seeking",
    "Justice & Rights", "Well-being & Peace", "Wisdom & Knowledge",
]
TOPICS = ["sourdough starters", "binary search", "tide tables", "tax deadlines", "marathon training",
          "sleep hygiene", "haiku", "git rebase", "household budgets", "photosynthesis", "chess endgames",
          "email etiquette", "bird migration", "compound interest", "watercolour washes"]


def pytest_addoption(parser):
    parser.addoption(
        "--test-order", choices=("default", "reverse", "random"), default="default",
        help="run the collected tests in reverse or shuffled order (shows hidden order dependence)",
    )
    parser.addoption("--test-order-seed", type=int, default=0, help="seed of --test-order random")


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--test-order")
    if order == "reverse":
        items.reverse()
    elif order == "random":
        random.Random(config.getoption("--test-order-seed")).shuffle(items)


def pytest_report_header(config):
    return f"fteval: test order {config.getoption('--test-order')}, torch threads {torch.get_num_threads()}"


@pytest.fixture(autouse=True)
def _fixed_global_seeds():
    """Every test starts from the same global RNG state (torch, numpy, random), whatever ran before it.

    Tests seed their own generators; this keeps any draw from the global streams (a module's
    initialisation, dropout) independent of test order. The torch thread count is restored too.
    """
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alignment_rows(n: int = 40) -> list[dict]:
    return [
        {
            "Prompt": f"Could you explain {TOPICS[i % len(TOPICS)]} to me? (variant {i})",
            "Instruction generated": f"Give a short, accurate explanation of {TOPICS[i % len(TOPICS)]}.",
            "Accepted Response": f"Sure: {TOPICS[i % len(TOPICS)]} works like this, in brief.",
            "Rejected Response": "Figure it out yourself.",
        }
        for i in range(n)
    ]


def accd_rows(n_safe: int = 35, n_unsafe: int = 35) -> list[dict]:
    rows = []
    for i in range(n_safe):
        rows.append({"axiom": AXIOMS[i % 7], "safety_label": "safe", "input": f"How do I get better at {TOPICS[i % len(TOPICS)]}, step {i}?",
                     "target": "Practice a little every day.", "source_dataset": "test"})
    for i in range(n_unsafe):
        rows.append({"axiom": AXIOMS[i % 7], "safety_label": "unsafe", "input": f"Help me hack into my coworker's account number {i}.",
                     "target": "I can't help with that.", "source_dataset": "test"})
    return rows


@pytest.fixture()
def one_thread():
    """One torch intra-op thread for the test, restored afterwards.

    On the shared 2-core machine two OpenMP threads spin against other processes: small ops ran
    5-100x slower (a 256x64 @ 64x128 matmul took 12 ms instead of 0.14 ms; 3 prompts x 8 tokens of
    generation 15 s instead of 1.4 s). Modules of many small ops use it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from fteval.models.loading import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture()
def data_files(tmp_path) -> dict[str, Path]:
    return {
        "train": write_jsonl(tmp_path / "align.jsonl", alignment_rows()),
        "eval": write_jsonl(tmp_path / "accd.jsonl", accd_rows()),
    }
