"""Creating and opening the Alert Production Database (lsst-dax-apdb, SQL backend).

- `create_apdb` / the ``make_apdb.py`` console script: the guide's way to make
  an empty APDB (identical to ``apdb-cli create-sql``).
- `open_apdb`: from today's ``apdb_config_url`` or the guide's ``db_url``,
  with errors that say which command to run.
- `apdb_lock`, `retry_locked`: serialise diaPipe's load-associate-store
  section across processes (``pipetask run -j N``).
"""

from __future__ import annotations

from .._lazy import lazy_exports

# Lazy: diapipe.apdb.schema is used by tasks that never open an APDB; dax_apdb
# and SQLAlchemy load only when a connection is made.
_LAZY = {
    "ApdbAccessError": "connection",
    "ApdbConfigMismatchError": "connection",
    "ApdbLockTimeout": "locking",
    "ApdbNotFoundError": "connection",
    "ApdbSchemaMismatchError": "connection",
    "CreatedApdb": "connection",
    "METADATA_KEY": "connection",
    "apdb_lock": "locking",
    "create_apdb": "connection",
    "create_commands": "connection",
    "default_config_path": "connection",
    "is_locked_error": "locking",
    "normalize_db_url": "connection",
    "open_apdb": "connection",
    "redact_url": "connection",
    "retry_locked": "locking",
    "sqlite_path": "connection",
    "url_has_password": "connection",
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
