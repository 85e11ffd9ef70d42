"""Over-long prompts: evaluation prompts are cut by a stated rule, dropped training rows are announced."""

import json
import logging

import pytest

from fteval.data import AlignmentDataModule
from fteval.data.formatting import fit_prompt, format_prompt, generation_suffix_tokens
from tests.conftest import accd_rows, alignment_rows, write_jsonl

LONG = " ".join(f"word{i % 97}" for i in range(4000))  # several thousand tokens


def test_fit_prompt_keeps_the_template_and_the_message_start(tokenizer):
    message, text, ids, cut = fit_prompt(tokenizer, LONG, 64)
    assert cut and len(ids) <= 64 and len(ids) >= 60  # the cut moves back only by re-tokenisation slack
    assert LONG.startswith(message.strip()) and len(message) < len(LONG)
    assert text == format_prompt(tokenizer, message)
    suffix = generation_suffix_tokens(tokenizer)
    short_ids = tokenizer(format_prompt(tokenizer, "hi"), add_special_tokens=False)["input_ids"]
    assert ids[-suffix:] == short_ids[-suffix:]  # the post-instruction tokens survive the cut
    assert fit_prompt(tokenizer, "hello", 64)[3] is False


def test_fit_prompt_refuses_a_limit_below_the_template(tokenizer):
    with pytest.raises(ValueError, match="--data.max_length"):
        fit_prompt(tokenizer, LONG, 8, system_prompt="You are a careful assistant. " * 5)


def test_long_evaluation_prompts_are_cut_and_counted(tmp_path, caplog):
    rows = accd_rows(10, 10)
    for r in rows[:3] + rows[10:12]:  # 3 safe and 2 unsafe prompts far beyond the limit
        r["input"] = r["input"] + " " + LONG
    dm = AlignmentDataModule(eval_source=str(write_jsonl(tmp_path / "accd.jsonl", rows)), train_source=None,
                             output_dir=str(tmp_path / "stats"), max_length=48, n_per_class=10)
    with caplog.at_level(logging.WARNING):
        dm.setup("test")
    assert max(len(e["input_ids"]) for e in dm.eval_set) <= 48
    assert sum(r["truncated"] for r in dm.eval_records) == 5
    assert any("5 of 20 evaluation prompts" in m and "--data.max_length" in m for m in caplog.messages)
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[1] <= 48
    stats = json.loads((tmp_path / "stats" / "data_statistics.json").read_text())["evaluation"]
    assert stats["truncated_prompts"] == 5 and stats["token_limit"] == 48


def test_dropped_training_rows_warn_with_count_and_option(tmp_path, caplog):
    rows = alignment_rows(40)
    for r in rows[::2]:
        r["Prompt"] = r["Prompt"] + " " + LONG
    files = {"train": write_jsonl(tmp_path / "a.jsonl", rows), "eval": write_jsonl(tmp_path / "e.jsonl", accd_rows())}
    dm = AlignmentDataModule(train_source=str(files["train"]), eval_source=str(files["eval"]),
                             output_dir=str(tmp_path / "stats"), max_length=96, n_per_class=10)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    assert len(dm.train_set) + len(dm.val_set) == 20
    assert any("20 of 40 training rows dropped" in m and "--data.max_length" in m for m in caplog.messages)
    caplog.clear()
    quiet = AlignmentDataModule(train_source=str(write_jsonl(tmp_path / "b.jsonl", alignment_rows(40))),
                                eval_source=str(files["eval"]), output_dir=str(tmp_path / "s2"), max_length=96)
    with caplog.at_level(logging.WARNING):
        quiet.setup("fit")
    assert not any("dropped" in m for m in caplog.messages)


def test_token_limit_is_capped_by_the_model():
    from types import SimpleNamespace

    from fteval.data.formatting import prompt_token_limit

    assert prompt_token_limit(SimpleNamespace(model_max_length=40), 128) == 40
    assert prompt_token_limit(SimpleNamespace(model_max_length=int(1e30)), 128) == 128  # transformers' "no limit"
    assert prompt_token_limit(SimpleNamespace(), 128) == 128
