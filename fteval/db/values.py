"""Python values -> what the database stores: JSON with secrets redacted, file digests, floats."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["as_float", "path_digest", "redact_secrets", "to_json"]

_CHUNK = 1 << 20  # bytes read per sha256 update (1 MiB)

# Keys whose *string* values are credentials. Matched on the whole key, lower-cased, so
# `max_new_tokens`, `pad_token` & co. (tokenizer settings, not secrets) stay as they are.
_SECRET_KEYS = frozenset(
    {"token", "hf_token", "hub_token", "access_token", "auth_token", "use_auth_token", "api_key", "apikey",
     "openai_api_key", "password", "passwd", "secret", "secret_key", "authorization"}
)
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{30,}")  # the shape of a Hugging Face user access token


def redact_secrets(obj: Any) -> Any:
    """Copy of a JSON-like structure with credentials replaced by ``"<redacted>"``.

    A value is redacted when its key is a credential name (``token``, ``api_key``, ...;
    see ``_SECRET_KEYS``) and the value is a string, or when a string contains something
    shaped like a Hugging Face token (``hf_`` + 30 or more letters/digits).
    """
    if isinstance(obj, Mapping):
        return {
            k: "<redacted>" if str(k).lower() in _SECRET_KEYS and isinstance(v, str) and v else redact_secrets(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    if isinstance(obj, str):
        return _HF_TOKEN_RE.sub("<redacted>", obj)
    return obj


def _jsonable(obj: Any) -> Any:
    """`json.dumps` fallback: jsonargparse Namespaces, paths, numpy/torch scalars, the rest as repr."""
    if hasattr(obj, "as_dict"):  # jsonargparse.Namespace
        return obj.as_dict()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch 0-d values
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def to_json(obj: Any) -> Optional[str]:
    """Deterministic JSON text of ``obj`` with secrets redacted; None stays None."""
    if obj is None:
        return None
    plain = json.loads(json.dumps(obj, default=_jsonable))  # resolve Namespaces etc. before redacting
    return json.dumps(redact_secrets(plain), sort_keys=True)


def path_digest(path: Union[str, Path]) -> tuple[int, str, bool]:
    """Size in bytes, sha256 hex digest and is-directory flag of a file or a directory.

    A directory's digest is the sha256 over its files in sorted relative-path order of
    ``"<relative path>\\0<file sha256>\\n"``, so renaming or changing any file changes it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Artifact path {path} does not exist; write the file before recording it.")

    def file_hash(p: Path) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        with open(p, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    if path.is_file():
        size, digest = file_hash(path)
        return size, digest, False
    outer, total = hashlib.sha256(), 0
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        size, digest = file_hash(p)
        total += size
        outer.update(f"{p.relative_to(path).as_posix()}\0{digest}\n".encode())
    return total, outer.hexdigest(), True


def as_float(value: Any, what: str) -> Optional[float]:
    """A metric value as float; None and NaN are stored as NULL (SQLite has no NaN)."""
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be a number, got {value!r}.") from err
    return None if math.isnan(out) else out
