"""``python -m fteval``: Trainer subcommands go to LightningCLI, the other commands to a jsonargparse CLI.

LightningCLI's own subcommands must be Trainer methods; the others (env, data-stats, merge, ...)
are plain typed functions whose signature and docstring are their command line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

TRAINER_COMMANDS = ("fit", "validate", "test")


def _commands() -> dict:
    """Non-Trainer commands: name -> function (or nested dict for groups)."""
    from fteval import db
    from fteval.analysis.compare import compare
    from fteval.analysis.report import report
    from fteval.bench import bench_eval, bench_generation, bench_stats, bench_train
    from fteval.bench.grit_ablation import bench_grit_ablation
    from fteval.bench.pipeline import bench_pipeline
    from fteval.controls import bench_controls
    from fteval.eval.refusal import classify_refusals
    from fteval.data.stats_command import data_stats
    from fteval.envinfo import env
    from fteval.models.export import export
    from fteval.models.merge import merge

    return {
        "env": env,
        "data-stats": data_stats,
        "merge": merge,
        "export": export,
        "compare": compare,
        "report": report,
        "classify-refusals": classify_refusals,
        "db": {"export": db.export},
        "bench": {"train": bench_train, "eval": bench_eval, "generation": bench_generation,
                  "grit-ablation": bench_grit_ablation, "stats": bench_stats, "controls": bench_controls,
                  "pipeline": bench_pipeline},
    }


def _overview() -> str:
    lines = [
        "usage: python -m fteval COMMAND [options]   (COMMAND --help for its options)",
        "",
        "Training and evaluation (LightningCLI, take --config FILE.yaml; a bare NAME.yaml that is not a",
        "path is looked up in configs/, e.g. --config grit.yaml):",
        "  fit        fine-tune (configs/qlora.yaml, configs/grit.yaml)",
        "  validate   validation loss of a model/checkpoint",
        "  test       AQI + behavioural evaluation (configs/aqi.yaml)",
        "",
        "Tools:",
    ]
    for name, fn in _commands().items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if not isinstance(fn, dict) else "subcommands: " + ", ".join(fn)
        lines.append(f"  {name:<10} {doc}")
    lines += ["", "TensorBoard: tensorboard --logdir lightning_logs"]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from fteval.backends.base import BackendError
    from fteval.data.sources import DataSourceError
    from fteval.models.loading import ModelLoadError

    return (ValueError, FileNotFoundError, FileExistsError, DataSourceError, ModelLoadError, BackendError,
            MisconfigurationException)  # Lightning's own checks of Trainer arguments


def resolve_config_args(argv: list[str], cwd: Path | None = None) -> list[str]:
    """``--config NAME.yaml`` that is not an existing path -> ``configs/NAME.yaml`` when that exists.

    Looked up in ``./configs`` and then in the ``configs`` folder beside the installed package, so
    ``python -m fteval fit --config grit.yaml`` works from the repository root.
    """
    cwd = Path.cwd() if cwd is None else cwd
    roots = [cwd / "configs", Path(__file__).resolve().parents[1] / "configs"]
    out = list(argv)
    for i, arg in enumerate(out):
        value, prefix = None, ""
        if arg == "--config" and i + 1 < len(out):
            value, j = out[i + 1], i + 1
        elif arg.startswith("--config="):
            value, j, prefix = arg.split("=", 1)[1], i, "--config="
        if value is None or (cwd / value).exists() or Path(value).is_absolute():
            continue
        found = next((r / value for r in roots if (r / value).is_file()), None)
        if found is not None:
            out[j] = prefix + str(found)
    return out


def _config_files(argv: list[str]) -> list[str]:
    """The files given with ``--config`` (in order)."""
    files = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def _one_line(message: str, command: str, argv: list[str] = ()) -> str:
    """A parser's (multi-line) message as one line, with where to look for the accepted options.

    The YAML reader names the text it parsed ``"<unicode string>"``; the config file is named instead
    (the files when several were given).
    """
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    if '"<unicode string>"' in text and (files := _config_files(list(argv))):
        text = text.replace('"<unicode string>"', " or ".join(files))
    if len(text) > 600:
        text = text[:600] + " ..."
    return f"{text} (accepted options: python -m fteval {command} --help)"


def _user_message(exc: BaseException) -> str:
    """The reason of a user error in one line.

    jsonargparse wraps an error raised while instantiating a class given by ``class_path`` (e.g. a
    module's argument check) in "Does not validate against any of the Union subtypes ... Errors:"
    with one entry per candidate type and the whole namespace; the entry that is not the trivial
    ``NoneType`` alternative is the reason.
    """
    text = str(exc)
    if "Does not validate against any of the Union subtypes" in text:
        reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
        reasons = [r for r in reasons if not r.startswith("Expected a <class 'NoneType'>")]
        if reasons:
            text = reasons[0]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(a for a in argv[:2] if not a.startswith("-")) or "COMMAND"
    try:
        if argv and argv[0] in TRAINER_COMMANDS:
            from lightning.pytorch.utilities.exceptions import SIGTERMException

            from fteval.cli import FTEvalCLI

            argv = resolve_config_args(argv)
            if from_sys:  # LightningCLI reads sys.argv itself (and warns when given both)
                sys.argv[1:] = argv
            try:
                FTEvalCLI(args=None if from_sys else argv)
            except SIGTERMException:  # Lightning stops at the next batch and exits with no status of its own
                print("fteval: stopped by SIGTERM; the run is recorded as interrupted", file=sys.stderr)
                sys.exit(128 + signal.SIGTERM)
            return
        if not argv or argv[0] in ("-h", "--help"):
            print(_overview())
            return
        commands = _commands()
        if argv[0] not in commands and not argv[0].startswith("-"):
            raise ValueError(f"unknown command {argv[0]!r}; the commands are {', '.join([*TRAINER_COMMANDS, *commands])} "
                             "(python -m fteval --help)")
        from jsonargparse import CLI

        # exit_on_error=False: a parse error raises instead of printing the whole usage first.
        result = CLI(commands, args=argv, as_positional=True, exit_on_error=False)  # required arguments are positional
        if isinstance(result, int) and result != 0:
            sys.exit(result)
    except KeyboardInterrupt:  # Ctrl-C in a tool command (the Trainer commands record the run as interrupted)
        if os.environ.get("FTEVAL_TRACEBACK"):
            raise
        print("fteval: interrupted (Ctrl-C); files are written whole or not at all, so nothing is half-written",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except argparse.ArgumentError as exc:
        if os.environ.get("FTEVAL_TRACEBACK"):
            raise
        print(f"fteval: error: {_one_line(exc.message if hasattr(exc, 'message') else exc, command, argv)}", file=sys.stderr)
        sys.exit(2)
    except _user_errors() as exc:
        if os.environ.get("FTEVAL_TRACEBACK"):
            raise
        print(f"fteval: error: {_user_message(exc)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
