"""Errors a user can cause: one line, exit 2, nothing deleted or half-written."""

import json
from pathlib import Path

import pytest

from fteval.__main__ import _user_message, main, resolve_config_args
from fteval.data.sources import DataSourceError, load_records
from fteval.io import atomic_directory, atomic_files, check_adapter_folder, check_checkpoint_file


def _run(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "usage:" not in err, err
    last = err.splitlines()[-1]  # earlier lines can only be progress output (loading weights)
    assert last.startswith("fteval: error: ") and err.count("fteval: error") == 1, err
    return last


def test_config_name_found_in_configs_folder(tmp_path):
    argv = resolve_config_args(["fit", "--config", "grit.yaml"], cwd=tmp_path)
    assert Path(argv[2]).name == "grit.yaml" and Path(argv[2]).parent.name == "configs" and Path(argv[2]).is_file()
    assert resolve_config_args(["fit", "--config=qlora.yaml"], cwd=tmp_path)[1].endswith("configs/qlora.yaml")
    (tmp_path / "grit.yaml").write_text("seed_everything: 1\n")  # an existing path wins
    assert resolve_config_args(["fit", "--config", "grit.yaml"], cwd=tmp_path) == ["fit", "--config", "grit.yaml"]
    assert resolve_config_args(["fit", "--config", "nothere.yaml"], cwd=tmp_path)[2] == "nothere.yaml"


@pytest.mark.parametrize("extra, expected", [
    (["--trainer.max_steps", "abc"], 'trainer.max_steps'),
    (["--no_such_key", "1"], "unrecognized arguments: --no_such_key"),
])
def test_parse_errors_are_one_line(extra, expected, capsys):
    err = _run(["fit", "--config", "configs/grit.yaml", *extra], capsys)
    assert expected in err and "fit --help" in err


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    err = _run(["fit", "--config", str(bad)], capsys)
    assert "Problems parsing config" in err and str(bad) in err and "<unicode string>" not in err


def test_missing_tool_arguments_are_one_line(capsys):
    err = _run(["merge"], capsys)
    assert "merge.adapter" in err and "merge --help" in err


def test_class_argument_errors_name_the_reason():
    wrapped = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [A, NoneType]\nErrors:\n"
        "  - r=0: the adapter rank must be a positive integer\n  - Expected a <class 'NoneType'>\nGiven value: ..."
    )
    assert _user_message(wrapped) == "r=0: the adapter rank must be a positive integer"
    assert _user_message(ValueError("plain\nmessage")) == "plain message"


def test_truncated_checkpoint_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch):
    import torch

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64)}}, good)
    check_checkpoint_file(good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        check_checkpoint_file(bad)
    monkeypatch.chdir(tmp_path)
    err = _run(["fit", "--config", str(Path(__file__).parents[1] / "configs/grit.yaml"), "--ckpt_path", str(bad)], capsys)
    assert "bad.ckpt" in err and "--ckpt_path" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt", "good.ckpt"]  # no log folder, no database


def test_truncated_adapter_weights_are_reported(tmp_path):
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "embedded"}))
    save_file({"a": torch.ones(256), "b": torch.zeros(256)}, str(folder / "adapter_model.safetensors"))
    assert check_adapter_folder(folder)["base_model_name_or_path"] == "embedded"
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) - 300])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        check_adapter_folder(folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_adapter_folder(folder)


def test_merge_refuses_a_non_empty_output_folder(tmp_path, capsys):
    from tests.eval.test_module import make_adapter

    adapter = make_adapter(tmp_path / "adapter", 0.05)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    capsys.readouterr()  # the adapter's set-up output
    err = _run(["merge", str(adapter), str(out), "--quantization", "none"], capsys)
    assert "--overwrite" in err and str(out) in err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_atomic_directory_replaces_only_what_it_wrote(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target, overwrite=False) as tmp:
        (tmp / "a.bin").write_text("1")
        (tmp / "old_only.bin").write_text("1")
    (target / "user.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        with atomic_directory(target, overwrite=False) as tmp:
            (tmp / "a.bin").write_text("2")
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "a.bin").write_text("2")
    names = sorted(p.name for p in target.iterdir())
    assert names == [".fteval-written.json", "a.bin", "user.txt"]  # old_only.bin was fteval's: removed
    assert (target / "a.bin").read_text() == "2" and (target / "user.txt").read_text() == "mine"
    with pytest.raises(RuntimeError):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "a.bin").write_text("3")
            raise RuntimeError("failed half way")
    assert (target / "a.bin").read_text() == "2"  # untouched on error
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp folder cleaned


def test_atomic_files_add_to_a_folder_and_leave_it_untouched_on_error(tmp_path):
    target = tmp_path / "adapter"
    with atomic_files(target) as tmp:  # an adapter, then its factors, into one folder
        (tmp / "adapter_model.safetensors").write_text("1")
    with atomic_files(target) as tmp:
        (tmp / "kfac_factors.safetensors").write_text("1")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors", "kfac_factors.safetensors"]
    with pytest.raises(RuntimeError):
        with atomic_files(target) as tmp:
            (tmp / "adapter_model.safetensors").write_text("2")
            raise RuntimeError("failed half way")
    assert (target / "adapter_model.safetensors").read_text() == "1"
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        with atomic_files(tmp_path / "file"):
            pass


def test_local_files_report_the_broken_line(tmp_path):
    f = tmp_path / "eval.jsonl"
    f.write_text('{"input": "a", "safety_label": "safe"}\n{"input": "b", "safety_label": \n')
    with pytest.raises(DataSourceError, match=r"line 2 is not valid JSON"):
        load_records(str(f), "accd")
    f.write_bytes(b'{"input": "caf\xe9"}\n')
    with pytest.raises(DataSourceError, match="not valid UTF-8.*re-save it as UTF-8"):
        load_records(str(f), "accd")


def test_local_files_read_without_a_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = [{"input": "x", "safety_label": "safe"}, {"input": "y", "safety_label": "unsafe", "axiom": "A"}]
    jl = tmp_path / "e.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    js = tmp_path / "e.json"
    js.write_text(json.dumps(rows))
    cols = tmp_path / "cols.json"
    cols.write_text(json.dumps({"input": ["x", "y"], "safety_label": ["safe", "unsafe"]}))
    csvf = tmp_path / "e.csv"
    csvf.write_text('input,safety_label\n"x, with comma",safe\ny,unsafe\n')
    expected = [{"input": "x", "safety_label": "safe", "axiom": None}, {"input": "y", "safety_label": "unsafe", "axiom": "A"}]
    assert load_records(str(jl), "accd") == expected and load_records(str(js), "accd") == expected
    assert load_records(str(cols), "accd") == [{"input": "x", "safety_label": "safe"}, {"input": "y", "safety_label": "unsafe"}]
    assert load_records(str(csvf), "accd")[0] == {"input": "x, with comma", "safety_label": "safe"}
    assert load_records(str(jl), "accd", limit=1) == expected[:1]
    assert not (tmp_path / "cache").exists()


def test_unreadable_eval_source_stops_fit(data_files, tmp_path):
    from tests.data.test_datamodule import make_dm

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "a"\n')
    with pytest.raises(DataSourceError, match="remove its prompts from training"):
        make_dm({"train": data_files["train"], "eval": broken}, tmp_path).setup("fit")
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text('{"prompt": "a", "safety_label": "safe"}\n')
    with pytest.raises(DataSourceError, match="missing column"):
        make_dm({"train": data_files["train"], "eval": no_text}, tmp_path).setup("fit")


def test_failed_fit_leaves_no_log_folder_and_no_row(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"input": "a"\n')
    monkeypatch.chdir(tmp_path)
    err = _run(["fit", "--config", str(Path(__file__).parents[1] / "configs/grit.yaml"), "--data.eval_source", str(bad)],
               capsys)
    assert "eval.jsonl line 1" in err and "--data.eval_source" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl"]  # no lightning_logs/, no output/centralized.db


def test_checkpoint_of_another_method_is_named(tmp_path, capsys, monkeypatch):
    import torch

    ckpt = tmp_path / "qlora.ckpt"
    torch.save({"hyper_parameters": {"_class_path": "fteval.models.QLoRAModule", "r": 16}, "state_dict": {}}, ckpt)
    monkeypatch.chdir(tmp_path)
    err = _run(["fit", "--config", str(Path(__file__).parents[1] / "configs/grit.yaml"), "--ckpt_path", str(ckpt)], capsys)
    assert "written by a QLoRAModule run" in err and "trains GRITModule" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qlora.ckpt"]


def test_prompt_label_csv_hint_names_the_axiom_option(data_files, tmp_path):
    from tests.data.test_datamodule import make_dm

    csv_file = tmp_path / "safety.csv"
    csv_file.write_text("prompt,label\n" + "".join(f"question {i},{i % 2}\n" for i in range(20)))
    kw = dict(eval_text_field="prompt", eval_label_field="label", safe_values=["0"], unsafe_values=["1"])
    with pytest.raises(DataSourceError, match="--data.eval_axiom_field null"):
        make_dm({"train": data_files["train"], "eval": csv_file}, tmp_path, **kw).setup("test")
    dm = make_dm({"train": data_files["train"], "eval": csv_file}, tmp_path, eval_axiom_field=None, **kw)
    dm.setup("test")
    assert len(dm.eval_records) == 20


@pytest.mark.parametrize("extra, expected", [
    (["--data.batch_size", "0"], "--data.batch_size=0 must be an integer >= 1"),
    (["--trainer.max_steps", "-5"], "`max_steps` must be a non-negative integer"),
    (["--model.init_args.optimizer.init_args.lr", "-1"], "--model.init_args.optimizer: Invalid learning rate"),
    (["--model.init_args.target_modules", "[foo]"], "target_modules ['foo'] matched no"),
])
def test_bad_fit_values_leave_nothing_behind(extra, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _run(["fit", "--config", str(Path(__file__).parents[1] / "configs/grit.yaml"), *extra], capsys)
    assert expected in err
    assert list(tmp_path.iterdir()) == []  # no lightning_logs/, no output/ (statistics, database)


def test_unknown_command_lists_the_commands(capsys):
    err = _run(["predict", "--config", "qlora.yaml"], capsys)
    assert "unknown command 'predict'" in err and "fit, validate, test" in err


def test_evaluator_db_path_names_the_run_logger(tmp_path, capsys, monkeypatch):
    """The scores of fteval test go to the run logger's database; an evaluator db_path (older configs) is refused."""
    monkeypatch.chdir(tmp_path)
    err = _run(["test", "--config", str(Path(__file__).parents[1] / "configs/aqi.yaml"),
                "--model.init_args.db_path", "elsewhere.db"], capsys)
    assert "model.init_args.db_path='elsewhere.db' is no longer accepted" in err
    assert "callbacks.run_logger.ExperimentDBLogger" in err
    assert list(tmp_path.iterdir()) == []
