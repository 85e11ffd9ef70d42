"""Provenance of a processed data split: where its rows came from and a hash of what they became."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fteval.data.sources import bundled_path, describe_source

__all__ = ["split_provenance"]


def split_provenance(kind: str, split: str, source: str, processed: list[dict], details: dict) -> tuple[dict, str]:
    """The ``datasets`` entry of one processed split and the JSON-lines body of its rows.

    The entry names the source (file sha256 or hub id), the rows' count and the content hash of
    ``processed``; ``metadata.processed_file`` is where the body is written
    (``processed/<kind>-<split>-<hash>.jsonl``).
    """
    from fteval.db.values import path_digest

    path = bundled_path(kind) if source == "sample" else Path(source).expanduser()
    file_sha = path_digest(path)[1] if path.is_file() else None
    body = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in processed)
    content_sha = hashlib.sha256(body.encode("utf-8")).hexdigest()
    entry = {"name": kind, "split": split, "n_rows": len(processed), "source": describe_source(source, kind),
             "sha256": file_sha, "metadata": {**details, "content_sha256": content_sha,
                                              "processed_file": f"processed/{kind}-{split}-{content_sha[:12]}.jsonl"}}
    return entry, body
