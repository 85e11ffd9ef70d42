"""``python -m fteval``: Trainer subcommands go to LightningCLI, the other commands to a jsonargparse CLI.

LightningCLI's own subcommands must be Trainer methods; the others (env, data-stats, merge, ...)
are plain typed functions whose signature and docstring are their command line.
"""

from __future__ import annotations

import os
import sys

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


def _commands() -> dict:
    """Non-Trainer commands: name -> function (or nested dict for groups)."""
    from fteval import db
    from fteval.analysis.compare import compare
    from fteval.analysis.report import report
    from fteval.backends.bench import bench_generation
    from fteval.bench import bench_eval, bench_stats, bench_train
    from fteval.bench.grit_ablation import bench_grit_ablation
    from fteval.eval.refusal import classify_refusals
    from fteval.data.stats_command import data_stats
    from fteval.envinfo import env
    from fteval.models.merge import merge

    return {
        "env": env,
        "data-stats": data_stats,
        "merge": merge,
        "compare": compare,
        "report": report,
        "classify-refusals": classify_refusals,
        "db": {"export": db.export},
        "bench": {"train": bench_train, "eval": bench_eval, "generation": bench_generation,
                  "grit-ablation": bench_grit_ablation, "stats": bench_stats},
    }


def _overview() -> str:
    lines = [
        "usage: python -m fteval COMMAND [options]   (COMMAND --help for its options)",
        "",
        "Training and evaluation (LightningCLI, take --config FILE.yaml):",
        "  fit        fine-tune (configs/qlora.yaml, configs/grit.yaml)",
        "  validate   validation loss of a model/checkpoint",
        "  test       AQI + behavioural evaluation (configs/aqi.yaml)",
        "  predict    run the model over the evaluation prompts",
        "",
        "Tools:",
    ]
    for name, fn in _commands().items():
        doc = (fn.__doc__ or "").strip().splitlines()[0] if not isinstance(fn, dict) else "subcommands: " + ", ".join(fn)
        lines.append(f"  {name:<10} {doc}")
    lines += ["", "TensorBoard: tensorboard --logdir lightning_logs"]
    return "\n".join(lines)


def _user_errors() -> tuple[type[BaseException], ...]:
    from fteval.backends.base import BackendError
    from fteval.data.sources import DataSourceError
    from fteval.models.loading import ModelLoadError

    return (ValueError, FileNotFoundError, DataSourceError, ModelLoadError, BackendError)


def main(argv: list[str] | None = None) -> None:
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TRAINER_COMMANDS:
            from fteval.cli import FTEvalCLI

            FTEvalCLI(args=None if from_sys else argv)
            return
        if not argv or argv[0] in ("-h", "--help"):
            print(_overview())
            return
        from jsonargparse import CLI

        result = CLI(_commands(), args=argv, as_positional=True)  # required arguments are positional
        if isinstance(result, int) and result != 0:
            sys.exit(result)
    except _user_errors() as exc:
        if os.environ.get("FTEVAL_TRACEBACK"):
            raise
        print(f"fteval: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
