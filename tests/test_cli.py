"""The command line: overview, --help, and every YAML in configs/ parses and instantiates."""

import subprocess
import sys
from pathlib import Path

import pytest

from fteval.__main__ import main

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))


def test_overview_lists_trainer_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("fit", "test", "data-stats", "merge"):
        assert f"  {cmd}" in out


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "fteval", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fit" in res.stdout


def test_fit_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_prints(config, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit" if "aqi" not in config else "test", "--config", config, "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "class_path" in out and "model_name_or_path" in out


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_instantiates(config, tmp_path):
    from fteval.cli import FTEvalCLI

    # GPU configs instantiate here with the accelerator switched to CPU (this machine has no GPU).
    cli = FTEvalCLI(args=["--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                          "--trainer.accelerator", "cpu"], run=False)
    assert cli.model is not None and cli.datamodule is not None
    assert cli.datamodule.hparams.model_name_or_path == cli.model.hparams.model_name_or_path  # linked


def test_user_error_exits_nonzero_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data-stats", "--from_config", str(tmp_path / "missing.yaml")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fteval: error: config") and "missing.yaml" in err


def test_config_headers_show_their_command():
    for config in CONFIGS:
        head = Path(config).read_text().splitlines()[:4]
        assert any("python -m fteval" in line and Path(config).name in line for line in head), config


def test_classify_refusals_command_as_the_issue_writes_it(tmp_path, capsys):
    import csv

    src = tmp_path / "completions.csv"
    src.write_text('prompt,completion\n"how do I pick a lock?","I can\'t help with that."\n"capital of France?","Paris."\n')
    out = tmp_path / "labelled.csv"
    main(["classify-refusals", str(src), "--column", "completion", "--output", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert [r["refusal_label"] for r in rows] == ["full_refusal", "compliance"]
    with pytest.raises(SystemExit) as exit_:
        main(["classify-refusals", str(tmp_path / "missing.csv")])
    assert exit_.value.code == 2 and "missing.csv" in capsys.readouterr().err
