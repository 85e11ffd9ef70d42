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
    """Non-Trainer commands: name -> function (or nested dict for groups); a command whose module fails to
    import is an :class:`fteval.commands.Unavailable` instead."""
    from fteval.commands import load_commands

    return load_commands()


def _available(commands: dict) -> dict:
    """``commands`` without the unavailable ones (groups left with no command dropped too)."""
    from fteval.commands import Unavailable

    out = {}
    for name, fn in commands.items():
        if isinstance(fn, dict):
            fn = {sub: f for sub, f in fn.items() if not isinstance(f, Unavailable)}
            if fn:
                out[name] = fn
        elif not isinstance(fn, Unavailable):
            out[name] = fn
    return out


def _overview() -> str:
    lines = [
        "usage: python -m fteval COMMAND [options]   (COMMAND --help for its options)",
        "",
        "Training and evaluation (LightningCLI, take --config FILE.yaml; a bare NAME.yaml that is not a",
        "path is looked up in configs/, e.g. --config grit.yaml):",
        "  fit        fine-tune (configs/qlora.yaml, grit.yaml, qdora.yaml, lora.yaml)",
        "  validate   validation loss of a model/checkpoint",
        "  test       AQI + behavioural evaluation (configs/aqi.yaml)",
        "",
        "Tools:",
    ]
    from fteval.commands import Unavailable

    commands = _commands()
    for name, fn in commands.items():
        if isinstance(fn, Unavailable):
            doc = f"(unavailable) {fn.message()}"
        elif isinstance(fn, dict):
            doc = "subcommands: " + ", ".join(sub + (" (unavailable)" if isinstance(f, Unavailable) else "")
                                              for sub, f in fn.items())
        else:
            doc = (fn.__doc__ or "").strip().splitlines()[0]
        lines.append(f"  {name:<10} {doc}")
    for fn in (f for group in commands.values() if isinstance(group, dict) for f in group.values()):
        if isinstance(fn, Unavailable):
            lines.append(f"  {'':<10} {fn.command}: {fn.message()}")
    lines += ["", "TensorBoard: tensorboard --logdir lightning_logs"]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fteval.commands import CommandUnavailable

    errors: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError, CommandUnavailable)
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        from fteval.backends.base import BackendError
        from fteval.data.sources import DataSourceError
        from fteval.models.loading import ModelLoadError
    except Exception:  # a broken install: the error being handled is reported without these classes
        return errors
    return (*errors, DataSourceError, ModelLoadError, BackendError,
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
            try:
                from lightning.pytorch.utilities.exceptions import SIGTERMException

                from fteval.cli import FTEvalCLI
            except Exception as exc:  # a missing or half-installed package the Trainer commands import
                from fteval.commands import unavailable

                if os.environ.get("FTEVAL_TRACEBACK"):
                    raise
                unavailable(argv[0], exc).raise_()

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
        from fteval.commands import Unavailable

        wanted = commands.get(argv[0])
        if isinstance(wanted, dict):
            missing = [f for f in wanted.values() if isinstance(f, Unavailable)]
            if len(argv) > 1 and argv[1] in wanted:
                wanted = wanted[argv[1]]
            elif missing and len(missing) == len(wanted):  # the whole group is unavailable: the first reason
                wanted = missing[0]
            else:
                for f in missing:  # the group's help lists the others
                    print(f"fteval: {f.message()}", file=sys.stderr)
        if isinstance(wanted, Unavailable):  # say which package failed, and how to install it
            wanted.raise_()
        commands = _available(commands)
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
