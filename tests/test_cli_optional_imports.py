"""``--help`` with a missing or half-installed optional package, simulated in a subprocess by an import
hook that fails for the named packages; a command that needs the package says so in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fteval.commands import Unavailable, failed_package, pip_name, unavailable

# "missing": importing the package raises ModuleNotFoundError; "broken": the package's own module
# code raises while it is imported (as a native library that fails to load does).
HOOK = """
import importlib.abc, importlib.util, runpy, sys
mode, names = {mode!r}, set({names!r})
class Broken(importlib.abc.Loader):
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        code = compile("raise RuntimeError(__name__ + ': its native library failed to load')", module.__name__, "exec")
        exec(code, module.__dict__)
class Fail(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in names:
            if mode == "missing":
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return importlib.util.spec_from_loader(name, Broken())
sys.meta_path.insert(0, Fail())
sys.argv = ["fteval", *{args!r}]
runpy.run_module("fteval", run_name="__main__")
"""

OPTIONAL = ["bitsandbytes", "gguf", "llama_cpp", "datasets"]


def run(mode: str, names: list[str], *args: str) -> subprocess.CompletedProcess:
    code = HOOK.format(mode=mode, names=names, args=list(args))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("mode", ["missing", "broken"])
@pytest.mark.parametrize("args,expected", [
    (["--help"], "usage: python -m fteval COMMAND"),
    (["fit", "--help"], "--trainer.max_steps"),
    (["bench", "train", "--help"], "--cuda_graph"),
])
def test_help_works_without_the_optional_packages(mode, args, expected):
    res = run(mode, OPTIONAL, *args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert expected in res.stdout and "Traceback" not in res.stderr


def test_a_command_that_needs_a_broken_package_says_which_in_one_line():
    # A broken matplotlib breaks torchmetrics and with it Lightning: the overview still prints,
    # and every command that imports them names matplotlib and the pip command.
    res = run("broken", ["matplotlib"], "--help")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "usage: python -m fteval COMMAND" in res.stdout
    assert "compare    (unavailable) 'compare' needs matplotlib" in res.stdout
    for args in (["compare", "--help"], ["fit", "--help"], ["bench", "train", "--steps", "1"]):
        res = run("broken", ["matplotlib"], *args)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, (args, res.stderr[-2000:])
        assert lines[0].startswith(f"fteval: error: '{' '.join(a for a in args[:2] if not a.startswith('-'))}' "
                                   "needs matplotlib, which failed to import (RuntimeError: matplotlib")
        assert lines[0].endswith("install it with: pip install --upgrade matplotlib")


def test_failed_package_and_its_distribution():
    assert pip_name("sklearn") == "scikit-learn" and pip_name("yaml") == "pyyaml"
    assert pip_name("llama_cpp") == "llama-cpp-python" and pip_name("liger_kernel") == "liger-kernel"
    assert failed_package(ModuleNotFoundError("No module named 'gguf.quants'", name="gguf.quants")) == "gguf"
    assert failed_package(ImportError("x", name="fteval.models.loading")) is None  # fteval's own code: no package
    missing = unavailable("export", ModuleNotFoundError("No module named 'gguf'", name="gguf"))
    assert missing == Unavailable("export", "gguf", "ModuleNotFoundError: No module named 'gguf'")
    assert missing.message() == ("'export' needs gguf, which failed to import (ModuleNotFoundError: No module "
                                 "named 'gguf'); install it with: pip install --upgrade gguf")


def test_a_package_that_raises_while_importing_is_named():
    try:  # the module-level code of a half-installed package, raising while it is imported
        exec(compile("raise RuntimeError('libbitsandbytes_cpu.so: cannot open')", "cextension.py", "exec"),
             {"__name__": "bitsandbytes.cextension"})
    except RuntimeError as exc:
        assert failed_package(exc) == "bitsandbytes"
        assert unavailable("fit", exc).error == "RuntimeError: libbitsandbytes_cpu.so: cannot open"
    try:
        raise RuntimeError("a bug in fteval itself")
    except RuntimeError as exc:
        assert failed_package(exc) is None  # raised outside any import: no package to blame
        assert unavailable("fit", exc).message() == "'fit' cannot be imported (RuntimeError: a bug in fteval itself)"
