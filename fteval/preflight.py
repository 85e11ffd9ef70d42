"""Checks and claims made before a fit or test loads any model: one run, one folder, one record.

* :func:`claim_version_dir` claims a logger's ``version_N`` folder with one ``mkdir`` that fails
  when another process made it first, so two runs started together never share a folder (and so
  never read each other's ``config.yaml`` or overwrite each other's files).
* :class:`FolderLock` holds an exclusive ``fcntl.flock`` on a results or export folder for the
  life of the process; a second run aimed at the same folder stops at once with a one-line error.
  The lock file is named after the folder's resolved path and kept in the system's temporary folder
  (``$TMPDIR/fteval-locks``), so nothing is added to the user's folders; the lock covers runs on one
  machine, and the operating system releases it when the process ends, however it ends.
* :func:`check_output_folders` checks that every output folder can be written (a probe file is
  created and removed in the folder, or in its nearest existing parent when it does not exist
  yet) and that the file system has room for what the run will write.

Hand-written: neither Lightning nor the standard library offers an atomic version claim or a
non-blocking folder lock with a user-facing message.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

class OutputFolderError(ValueError):
    """An output folder that cannot be written or lacks room; the message names the setting and the fix."""


MiB = 1 << 20
#: Room kept free beyond the estimate: logs, event files, the database's growth, results JSON.
FREE_SPACE_MARGIN = 64 * MiB


def claim_version_dir(root: Path) -> str:
    """Create ``root/version_N`` for the next free N (one past the highest present) and return ``version_N``.

    ``os.mkdir`` fails when the folder exists, so of two processes claiming the same N one wins and
    the other moves on to N + 1.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))]
    n = max(numbers, default=-1) + 1
    while True:
        try:
            os.mkdir(root / f"version_{n}")
            return f"version_{n}"
        except FileExistsError:
            n += 1


class FolderLock:
    """An exclusive, non-blocking lock on ``folder`` for this process (see the module docstring).

    Args:
        folder: the folder a run writes into.
        option: the setting that names the folder, for the error message.
    """

    def __init__(self, folder: Path, option: str) -> None:
        self.folder = Path(folder).resolve()
        digest = hashlib.sha256(str(self.folder).encode()).hexdigest()[:24]
        self.path = Path(tempfile.gettempdir()) / "fteval-locks" / f"{digest}.lock"
        self.option = option
        self._fd: Optional[int] = None

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(mode=0o777, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = self._holder()
            raise FileExistsError(
                f"another run{holder} is writing to {self.folder}; wait for it to finish, or set {self.option} "
                "to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, option: str) -> Path:
    """Raise one :class:`OutputFolderError` naming ``folder`` and ``option`` unless a file can be created in it.

    A folder that does not exist yet is checked through its nearest existing parent (it will be
    created there). Returns that existing folder. Writing a probe catches what permission bits
    miss: read-only mounts, a full disk, a file where a folder should be.
    """
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise OutputFolderError(f"{option}={folder}: {base} is a file, not a folder; choose another folder")
    probe = base / f".fteval-probe-{uuid.uuid4().hex[:12]}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        raise OutputFolderError(
            f"{option}={folder} cannot be written ({exc.strerror} in {base}); choose a writable folder or fix its "
            "permissions"
        ) from None
    return base


def check_output_folders(folders: Iterable[tuple[Path, str]], need_bytes: int = 0) -> None:
    """Check each ``(folder, option)`` with :func:`check_writable`, and that each file system they are on has
    ``need_bytes`` + :data:`FREE_SPACE_MARGIN` free."""
    seen_devices: set[int] = set()
    for folder, option in folders:
        base = check_writable(folder, option)
        device = os.stat(base).st_dev
        if device in seen_devices:
            continue
        seen_devices.add(device)
        free = shutil.disk_usage(base).free
        need = int(need_bytes) + FREE_SPACE_MARGIN
        if free < need:
            raise OutputFolderError(
                f"{option}={folder}: only {free / MiB:.0f} MiB free on its file system, and this run needs about "
                f"{need / MiB:.0f} MiB; free some space or choose a folder on another disk"
            )


def adapter_bytes_estimate(config, r: int, target_modules: Iterable[str]) -> int:
    """fp32 bytes of LoRA factors of rank ``r`` on ``target_modules`` of a transformers decoder ``config``.

    Each adapted linear d_in -> d_out holds r * (d_in + d_out) numbers. The projection shapes are
    those of Llama-style decoders (q/k/v/o attention, gate/up/down MLP); a name not among them counts
    as hidden -> hidden.
    """
    h = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv = int(getattr(config, "num_key_value_heads", heads) or heads)
    head_dim = int(getattr(config, "head_dim", None) or h // heads)
    inter = int(getattr(config, "intermediate_size", 4 * h) or 4 * h)
    shapes = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
              "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(sum(shapes.get(name, (h, h))) for name in target_modules)
    return 4 * int(r) * per_layer * int(config.num_hidden_layers)
