"""The tool commands of ``python -m fteval`` (everything but the Trainer commands), imported one by one.

Each command is named by ``"module:function"`` and imported only when the overview or a command
line needs it; a command whose module fails to import (a missing or half-installed optional
package: matplotlib, bitsandbytes, gguf, llama_cpp, datasets, ...) becomes an
:class:`Unavailable`, so ``--help`` and the other commands keep working and running that command
says in one line which package failed and how to install it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Union

__all__ = ["TOOL_COMMANDS", "CommandUnavailable", "Unavailable", "failed_package", "load_commands", "pip_name"]

#: name -> "module:function", or a group: name -> {subcommand: "module:function"}.
TOOL_COMMANDS: dict[str, Union[str, dict[str, str]]] = {
    "env": "fteval.envinfo:env",
    "data-stats": "fteval.data.stats_command:data_stats",
    "merge": "fteval.models.merge:merge",
    "export": "fteval.models.export:export",
    "compare": "fteval.analysis.compare:compare",
    "report": "fteval.analysis.report:report",
    "classify-refusals": "fteval.eval.refusal.command:classify_refusals",
    "db": {"export": "fteval.db.export:export"},
    "bench": {"train": "fteval.bench.train:bench_train", "eval": "fteval.bench.eval:bench_eval",
              "generation": "fteval.bench.generation:bench_generation",
              "grit-ablation": "fteval.bench.grit_ablation:bench_grit_ablation",
              "stats": "fteval.bench.stats:bench_stats", "controls": "fteval.controls.command:bench_controls",
              "pipeline": "fteval.bench.pipeline:bench_pipeline"},
}

# Import names whose distribution is named otherwise, for packages that are not installed at all
# (installed ones are looked up in their metadata).
_DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python", "sklearn": "scikit-learn", "yaml": "pyyaml", "PIL": "pillow",
                  "liger_kernel": "liger-kernel"}
_OWN = ("fteval", "callbacks")


class CommandUnavailable(Exception):
    """A command (or the Trainer CLI) whose code cannot be imported; the message is one line."""


def pip_name(module: str) -> str:
    """The distribution that provides the top-level import ``module`` (what ``pip install`` takes), in
    its normalised form (PEP 503)."""
    dists = importlib.metadata.packages_distributions().get(module)
    name = dists[0] if dists else _DISTRIBUTIONS.get(module, module)
    return re.sub(r"[-_.]+", "-", name).lower()


def failed_package(exc: BaseException) -> Optional[str]:
    """The top-level package whose import raised ``exc``: the module an ``ImportError`` names, else the
    package of the innermost module being imported when it was raised (the deepest module-level
    frame of the traceback). None when that is fteval's own code."""
    if isinstance(exc, ImportError) and exc.name:
        top = exc.name.split(".")[0]
        return None if top in _OWN else top
    module = None
    tb: Optional[TracebackType] = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "<module>":
            module = tb.tb_frame.f_globals.get("__name__")
        tb = tb.tb_next
    top = (module or "").split(".")[0]
    return top if top and top not in _OWN and top != "__main__" else None


@dataclass(frozen=True)
class Unavailable:
    """A command whose module failed to import, and why."""

    command: str
    package: Optional[str]
    error: str  # "ImportError: ..." on one line

    def message(self) -> str:
        if self.package is None:
            return f"'{self.command}' cannot be imported ({self.error})"
        return (f"'{self.command}' needs {self.package}, which failed to import ({self.error}); "
                f"install it with: pip install --upgrade {pip_name(self.package)}")

    def raise_(self) -> None:
        raise CommandUnavailable(self.message())


def unavailable(command: str, exc: BaseException) -> Unavailable:
    """The :class:`Unavailable` for ``command`` whose import raised ``exc``."""
    text = " ".join(str(exc).split())[:300]
    return Unavailable(command, failed_package(exc), f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _load(command: str, target: str) -> Union[Callable[..., Any], Unavailable]:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:  # ImportError, or whatever a half-installed package raises while importing
        return unavailable(command, exc)


def load_commands(table: Optional[dict] = None) -> dict[str, Any]:
    """``table`` (default :data:`TOOL_COMMANDS`) with every ``"module:function"`` imported: the function,
    or an :class:`Unavailable` when its module fails to import."""
    out: dict[str, Any] = {}
    for name, target in (TOOL_COMMANDS if table is None else table).items():
        if isinstance(target, dict):
            out[name] = {sub: _load(f"{name} {sub}", t) for sub, t in target.items()}
        else:
            out[name] = _load(name, target)
    return out
