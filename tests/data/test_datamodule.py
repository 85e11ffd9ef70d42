import json
from collections import Counter

import pytest

from fteval.data import AlignmentDataModule
from fteval.data.sampling import balanced_stratified_sample, deduplicate, normalise_text
from fteval.data.sources import DataSourceError, bundled_path, load_records
from tests.conftest import accd_rows, alignment_rows, write_jsonl


def make_dm(files, tmp_path, **kw):
    args = dict(train_source=str(files["train"]), eval_source=str(files["eval"]), output_dir=str(tmp_path / "stats"),
                max_length=128, n_per_class=20)
    args.update(kw)
    return AlignmentDataModule(**args)


def test_split_is_seeded_and_statistics_written(data_files, tmp_path):
    a, b, c = make_dm(data_files, tmp_path), make_dm(data_files, tmp_path), make_dm(data_files, tmp_path, seed=7)
    for dm in (a, b, c):
        dm.setup("fit")
    assert not (tmp_path / "stats").exists()  # written when a loop asks for data, not at set-up
    a.train_dataloader()
    assert len(a.train_set) == 36 and len(a.val_set) == 4  # 40 rows, 90/10
    assert [e["input_ids"] for e in a.val_set] == [e["input_ids"] for e in b.val_set]
    assert [e["input_ids"] for e in a.val_set] != [e["input_ids"] for e in c.val_set]
    stats = json.loads((tmp_path / "stats" / "data_statistics.json").read_text())
    assert stats["training"]["train_examples"] == 36
    assert stats["training"]["prompt_tokens"]["min"] > 0


def test_deduplication_exact_and_normalised():
    rows = [{"Prompt": "Hello there?", "R": "a"}, {"Prompt": "Hello there?", "R": "a"},
            {"Prompt": "  hello   THERE ", "R": "b"}, {"Prompt": "Other", "R": "c"}]
    kept, stats = deduplicate(rows, "Prompt")
    assert [r["R"] for r in kept] == ["a", "c"]
    assert stats == {"exact_duplicates_removed": 1, "normalised_duplicates_removed": 1}
    assert normalise_text("Héllo,  World!") == normalise_text("héllo world")


def test_eval_overlap_removed_from_training(tmp_path):
    train = alignment_rows(20) + [{"Prompt": "How do I get better at haiku, step 6?", "Instruction generated": "x",
                                   "Accepted Response": "y", "Rejected Response": "z"}]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", train), "eval": write_jsonl(tmp_path / "e.jsonl", accd_rows())}
    dm = make_dm(files, tmp_path)
    dm.setup("fit")
    assert dm.statistics["training"]["removed_overlapping_eval_prompts"] == 1


def test_balanced_stratified_sample():
    labels = [0] * 70 + [1] * 30
    strata = [f"ax{i % 7}" for i in range(100)]
    idx, n = balanced_stratified_sample(labels, strata, n_per_class=20, seed=42)
    assert n == 20
    chosen = Counter(labels[i] for i in idx)
    assert chosen == {0: 20, 1: 20}
    per_axiom = Counter(strata[i] for i in idx if labels[i] == 0)
    assert max(per_axiom.values()) - min(per_axiom.values()) <= 1  # proportional to the (equal) axiom sizes
    assert balanced_stratified_sample(labels, strata, 20, 42)[0] == idx
    idx_all, n_all = balanced_stratified_sample(labels, strata, n_per_class=500, seed=42)
    assert n_all == 30 and len(idx_all) == 60  # capped by the smaller class to stay balanced


def test_test_set_balanced_and_formatted(data_files, tmp_path):
    dm = make_dm(data_files, tmp_path, n_per_class=14)
    dm.setup("test")
    assert Counter(r["label"] for r in dm.eval_records) == {0: 14, 1: 14}
    assert all(r["text"].endswith("<|im_start|>assistant\n") for r in dm.eval_records)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "safety_label", "index"}
    kc = dm.statistics["evaluation"]["keyword_categoriser"]
    assert kc["confusion_matrix"] == [[14, 0], [0, 14]]  # "hack" marks every unsafe fixture prompt


def test_csv_with_other_column_names(tmp_path):
    csv = tmp_path / "safety.csv"
    lines = ["prompt,label"] + [f"benign question {i},0" for i in range(6)] + [f"harmful request {i},1" for i in range(6)]
    csv.write_text("\n".join(lines) + "\n")
    files = {"train": write_jsonl(tmp_path / "t.jsonl", alignment_rows(10)), "eval": csv}
    dm = make_dm(files, tmp_path, eval_text_field="prompt", eval_label_field="label", eval_axiom_field=None, n_per_class=5)
    dm.setup("test")
    assert len(dm.eval_records) == 10


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_column", "missing column(s) ['Instruction generated']"),
        ("unknown_label", "has value 'maybe'"),
        ("one_class", "0 unsafe prompts"),
        ("empty_file", "is empty"),
        ("unreadable", "line 1 is not valid JSON"),
        ("missing_file", "does not exist"),
    ],
)
def test_bad_input_errors(case, message, tmp_path, data_files):
    files = dict(data_files)
    stage = "fit"
    if case == "missing_column":
        files["train"] = write_jsonl(tmp_path / "bad.jsonl", [{"Prompt": "a", "Accepted Response": "b"}] * 3)
    elif case == "unknown_label":
        rows = accd_rows(4, 4)
        rows[2]["safety_label"] = "maybe"
        files["eval"], stage = write_jsonl(tmp_path / "bad.jsonl", rows), "test"
    elif case == "one_class":
        files["eval"], stage = write_jsonl(tmp_path / "bad.jsonl", accd_rows(6, 0)), "test"
    elif case == "empty_file":
        (tmp_path / "empty.jsonl").write_text("")
        files["train"] = tmp_path / "empty.jsonl"
    elif case == "unreadable":
        (tmp_path / "broken.jsonl").write_text('{"Prompt": "a", \n not json at all\n')
        files["train"] = tmp_path / "broken.jsonl"
    elif case == "missing_file":
        files["train"] = tmp_path / "nope.jsonl"
    dm = make_dm(files, tmp_path)
    with pytest.raises(DataSourceError) as err:
        dm.setup(stage)
    assert message in str(err.value)
    assert not (tmp_path / "stats" / "data_statistics.json").exists()


def test_constructor_rejects_bad_settings():
    with pytest.raises(ValueError, match="val_fraction"):
        AlignmentDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="n_per_class"):
        AlignmentDataModule(n_per_class=1)


def test_bundled_samples_meet_the_promised_sizes():
    train = load_records("sample", "alignment-instructions")
    assert len(train) >= 200
    assert set(train[0]) == {"Prompt", "Instruction generated", "Accepted Response", "Rejected Response"}
    ev = load_records("sample", "accd")
    counts = Counter((r["axiom"], r["safety_label"]) for r in ev)
    assert sum(v for (a, l), v in counts.items() if l == "safe") >= 300
    assert sum(v for (a, l), v in counts.items() if l == "unsafe") >= 300
    assert len({a for a, _ in counts}) == 7
    assert bundled_path("accd").name == "accd_sample.jsonl"


def test_padding_free_loaders_flatten_batches(data_files, tmp_path):
    padded = make_dm(data_files, tmp_path, batch_size=3)
    flat = make_dm(data_files, tmp_path, batch_size=3, padding_free=True)
    for dm in (padded, flat):
        dm.setup("fit")
    bp, bf = next(iter(padded.val_dataloader())), next(iter(flat.val_dataloader()))
    assert "attention_mask" not in bf and bf["num_sequences"] == 3
    n_real = int(bp["attention_mask"].sum())
    assert bf["input_ids"].shape == (1, n_real) and n_real < bp["input_ids"].numel()  # the padding is gone
    assert int((bf["labels"] != -100).sum()) == int((bp["labels"] != -100).sum())
    assert int((bf["position_ids"] == 0).sum()) == 3
    assert next(iter(flat.train_dataloader()))["input_ids"].shape[0] == 1
