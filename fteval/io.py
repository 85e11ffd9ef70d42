"""Writing files and folders so that an interrupted run never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator


# Lists the entries fteval wrote into a folder, so that a later overwrite removes exactly those.
WRITTEN_MANIFEST = ".fteval-written.json"


def csv_reader(fh, **kwargs):
    """``csv.DictReader`` over ``fh`` that accepts cells of any length.

    The standard library refuses cells over 131,072 characters by default (a process-wide limit);
    responses and prompts can be longer, so the limit is raised to the largest the C reader takes.
    """
    import csv

    csv.field_size_limit(2**31 - 1)
    return csv.DictReader(fh, **kwargs)


def _written(target: Path) -> list[str]:
    manifest = target / WRITTEN_MANIFEST
    try:
        names = json.loads(manifest.read_text())["entries"] if manifest.is_file() else []
    except (ValueError, KeyError, TypeError):
        names = []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]


def check_writable_directory(target: Path, overwrite: bool, option: str = "--overwrite") -> None:
    """Raise ``FileExistsError`` unless ``target`` is absent, empty, or ``overwrite`` is set.

    Call it before expensive work so a refused target costs nothing.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output folder")
    if not overwrite and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(
            f"output folder {target} already exists and is not empty; choose a new folder, or pass {option} "
            "to replace what fteval wrote there (other files are kept)"
        )


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = True, keep_foreign: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success its entries move into ``target``.

    Nothing is deleted that fteval did not write: when ``target`` exists, only the entries listed
    in its manifest (``.fteval-written.json``, the previous write) are removed before the new
    entries are moved in, one ``os.replace`` each; a user's other files stay. A new or empty
    ``target`` is replaced in one rename. With ``overwrite=False`` a non-empty ``target`` is refused
    (``FileExistsError``). With ``keep_foreign`` a same-named entry fteval did not write is never
    replaced either: the write is refused (``FileExistsError`` naming those entries) before ``target``
    changes. On error the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    check_writable_directory(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir())
        (tmp / WRITTEN_MANIFEST).write_text(json.dumps({"entries": entries}))
        check_writable_directory(target, overwrite)
        if keep_foreign and target.is_dir():
            theirs = sorted(n for n in entries if (target / n).exists() and n not in _written(target))
            if theirs:
                raise FileExistsError(
                    f"{target} holds {', '.join(theirs[:5])}, not written by fteval, where this write would put its "
                    "own files of those names; move them or choose another output folder (nothing was changed)"
                )
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        if not target.exists():
            os.replace(tmp, target)
            return
        for name in _written(target):
            old = target / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        for name in [*entries, WRITTEN_MANIFEST]:
            dest = target / name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)  # a same-named folder: replaced, as overwrite asked
            os.replace(tmp / name, dest)
        tmp.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside the folder ``target``; on success each file in it replaces its namesake in ``target``.

    For several writers that add their files to one folder (an adapter, then its K-FAC factors):
    every file lands whole (one ``os.replace`` each), files of the same name are replaced and
    every other file in ``target`` stays. On error the temporary folder is removed and ``target``
    is untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another output folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _temporary_file_beside(path: Path) -> Path:
    """Create an empty, uniquely named hidden file in ``path``'s folder (same file system: the rename is atomic).

    Created with mode 0o666 less the umask, as a plain write would create ``path`` itself.
    """
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Let ``write(tmp)`` write a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one, never a part; on any error the temporary file
    is removed and ``path`` is left as it was. Missing parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_file_beside(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write UTF-8 text to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: Path, payload: Any, *, canonical: bool = False) -> Path:
    """Write ``payload`` as JSON indented by 2 to ``path`` atomically (:func:`write_atomic`).

    Default: keys in insertion order, values JSON has no type for written as ``str(value)``, no
    final newline (results files). ``canonical=True``: keys sorted, a final newline, and a value
    JSON has no type for raises ``TypeError`` before anything is written (the environment manifest
    and the benchmark files, which are compared between machines and runs).
    """
    if canonical:
        text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    else:
        text = json.dumps(payload, indent=2, default=str)
    return write_text_atomic(path, text)


def check_adapter_folder(path: Path) -> dict:
    """Validate a PEFT adapter folder on open; return its ``adapter_config.json``.

    A missing file, a config that is not a JSON object, or a truncated or corrupt
    ``adapter_model.safetensors`` raises one ``ValueError`` naming the folder and the fix, instead
    of a library traceback later.
    """
    path = Path(path)
    cfg, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter folder (needs adapter_config.json and adapter_model.safetensors); "
            "pass the 'adapter' folder written by `fteval fit`"
        )
    try:
        config = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg} is not valid JSON ({exc}); re-export the adapter with `fteval fit`") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg} must hold a JSON object; re-export the adapter with `fteval fit`")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            for key in fh.keys():
                fh.get_slice(key)
    except Exception as exc:  # safetensors raises its own SafetensorError for truncated/corrupt files
        raise ValueError(
            f"{weights} is truncated or corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "re-export the adapter with `fteval fit` or copy the file again"
        ) from None
    return config


def check_checkpoint_file(path: Path) -> None:
    """Raise one ``ValueError`` when a Lightning ``.ckpt`` (a torch zip archive) is truncated or corrupt."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member and checks its CRC
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(
            f"checkpoint {path} is truncated or not a checkpoint ({exc}); pass another --ckpt_path "
            "(e.g. an earlier one in the run's checkpoints/ folder)"
        ) from None
    if bad is not None:
        raise ValueError(f"checkpoint {path} is corrupt (member {bad!r} fails its checksum); pass another --ckpt_path")
