"""Creating and opening the Alert Production Database (lsst-dax-apdb, SQL backend).

- `create_apdb` / the ``make_apdb.py`` console script: the guide's way to make
  an empty APDB (identical to ``apdb-cli create-sql``).
- `open_apdb`: from today's ``apdb_config_url`` or the guide's ``db_url``,
  with errors that say which command to run.
- `apdb_lock`, `retry_locked`: serialise diaPipe's load-associate-store
  section across processes (``pipetask run -j N``).
"""

from .connection import (
    METADATA_KEY,
    ApdbAccessError,
    ApdbConfigMismatchError,
    ApdbNotFoundError,
    ApdbSchemaMismatchError,
    CreatedApdb,
    create_apdb,
    create_commands,
    default_config_path,
    normalize_db_url,
    open_apdb,
    redact_url,
    sqlite_path,
    url_has_password,
)
from .locking import ApdbLockTimeout, apdb_lock, is_locked_error, retry_locked

__all__ = [
    "METADATA_KEY",
    "ApdbAccessError",
    "ApdbConfigMismatchError",
    "ApdbNotFoundError",
    "ApdbSchemaMismatchError",
    "ApdbLockTimeout",
    "CreatedApdb",
    "create_apdb",
    "create_commands",
    "default_config_path",
    "normalize_db_url",
    "open_apdb",
    "redact_url",
    "sqlite_path",
    "url_has_password",
    "apdb_lock",
    "is_locked_error",
    "retry_locked",
]
