"""The centralized experiment database (``output/centralized.db``): schema, data layer, export.

* :class:`ExperimentDB` (``store.py``): open/migrate, ``transaction()``, typed insert and
  query helpers.
* ``schema.py``: the versioned schema as ordered migrations.
* ``connection.py``: file validation (foreign/corrupt/newer files are refused untouched),
  WAL and busy-timeout settings, migrations with a ``<name>.bak-v<old>`` backup.
* ``values.py``: JSON with secrets redacted, file size + sha256, float coercion.
* :func:`export` (``export.py``): ``fteval db export`` to CSV/JSON/Parquet.
"""

from fteval.db.connection import DatabaseFileError
from fteval.db.export import export
from fteval.db.schema import LATEST_VERSION, TABLES
from fteval.db.store import ExperimentDB
from fteval.db.values import path_digest, redact_secrets

__all__ = ["DatabaseFileError", "ExperimentDB", "LATEST_VERSION", "TABLES", "export", "path_digest", "redact_secrets"]
