"""Create and open an APDB (lsst-dax-apdb, SQL backend) the two ways users meet.

Two ways to name an APDB
------------------------
- Today's: an APDB config YAML (``apdb_config_url``), written by
  ``apdb-cli create-sql DB_URL apdb.yaml``.
- The guide's (2022): the database URL itself (``apdb.db_url`` plus
  ``apdb.isolation_level``), the APDB made by ``make_apdb.py -c db_url=...``.

`create_apdb` (behind the ``make_apdb.py`` console script) makes exactly the
APDB ``apdb-cli create-sql`` makes (same dax_apdb call, `ApdbSql.init_database`)
and writes the config YAML **beside an sqlite database**:
``sqlite:////abs/path/run1.db`` → ``/abs/path/run1.apdb.yaml``
(`default_config_path`). `open_apdb` given a db_url uses that file when it
exists, so either creation route works with either pipeline config.

URLs, passwords
---------------
- ``postgresql://`` is rewritten to ``postgresql+psycopg2://``: with SQLAlchemy
  2.1 the bare scheme picks psycopg 3, with which ``store()`` fails.
- A password never appears in a message or log line (`redact_url`). The
  pipeline refuses db_urls with a password, because pipeline configs are
  stored in the butler; put it in ``~/.lsst/db-auth.yaml`` (dax_apdb reads it)
  or ``~/.pgpass``.

Errors
------
`ApdbNotFoundError` (no database, or not an APDB: says which command makes
one), `ApdbSchemaMismatchError` (made with another schema/code version),
`ApdbConfigMismatchError` (the pipeline's settings differ from how the APDB
was made). All are `ApdbAccessError`, a `RuntimeError`.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

__all__ = [
    "ApdbAccessError",
    "ApdbNotFoundError",
    "ApdbSchemaMismatchError",
    "ApdbConfigMismatchError",
    "CreatedApdb",
    "METADATA_KEY",
    "normalize_db_url",
    "redact_url",
    "url_has_password",
    "sqlite_path",
    "default_config_path",
    "create_apdb",
    "open_apdb",
    "create_commands",
]

#: Metadata-table key under which make_apdb records the settings it was run with.
METADATA_KEY = "diapipe:make_apdb.json"

_SQLITE_ISOLATION = (None, "READ_UNCOMMITTED", "SERIALIZABLE")


class ApdbAccessError(RuntimeError):
    """The APDB named by a config cannot be used."""


class ApdbNotFoundError(ApdbAccessError):
    """No APDB at the given location (no database, or a database without APDB tables)."""


class ApdbSchemaMismatchError(ApdbAccessError):
    """The APDB was made with a schema (or dax_apdb code) version this diapipe cannot use."""


class ApdbConfigMismatchError(ApdbAccessError):
    """The pipeline's APDB settings differ from those the APDB was made with."""


# -- URLs ------------------------------------------------------------------------


def _make_url(db_url: str):
    import sqlalchemy

    try:
        return sqlalchemy.make_url(db_url)
    except Exception as err:  # sqlalchemy.exc.ArgumentError
        raise ValueError(f"not a database URL: {redact_url(db_url)!r} ({err})") from None


def redact_url(db_url: str) -> str:
    """``db_url`` with any password replaced by ``***`` (safe for messages and logs)."""
    import sqlalchemy

    try:
        url = sqlalchemy.make_url(db_url)
    except Exception:
        # Unparseable: strip anything between '://' and '@' conservatively.
        head, sep, rest = str(db_url).partition("://")
        if sep and "@" in rest:
            return f"{head}://***@{rest.split('@', 1)[1]}"
        return str(db_url)
    return url.render_as_string(hide_password=True)


def url_has_password(db_url: str) -> bool:
    """Whether ``db_url`` carries a password."""
    try:
        return bool(_make_url(db_url).password)
    except ValueError:
        return False


def sqlite_path(db_url: str) -> Path | None:
    """Absolute path of an sqlite database URL, None for other backends.

    Understands dax_apdb's rewritten form ``sqlite:///file:/abs/path?mode=rw&uri=true``;
    relative paths are made absolute against the current directory.
    """
    url = _make_url(db_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = unquote(url.database or "")
    if not database or database.startswith(":"):
        raise ValueError(f"an APDB cannot live in an in-memory sqlite database ({db_url!r})")
    if database.startswith("file:"):
        database = database[len("file:") :]
    database = "/" + database.lstrip("/") if database.startswith("//") else database
    return Path(database).expanduser().resolve()


def normalize_db_url(db_url: str) -> str:
    """The URL to connect with: psycopg2 driver for PostgreSQL, absolute sqlite paths."""
    if not isinstance(db_url, str) or not db_url.strip():
        raise ValueError("db_url is empty; give e.g. sqlite:////abs/path/run1.db")
    db_url = db_url.strip()
    url = _make_url(db_url)
    backend = url.get_backend_name()
    if backend == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
        return url.render_as_string(hide_password=False)
    if backend == "sqlite":
        return f"sqlite:///{sqlite_path(db_url)}"
    return db_url


def default_config_path(db_url: str) -> Path | None:
    """Where make_apdb writes the APDB config of an sqlite APDB (None for servers).

    ``/abs/path/run1.db`` → ``/abs/path/run1.apdb.yaml``.
    """
    path = sqlite_path(db_url)
    if path is None:
        return None
    return path.with_name(path.stem + ".apdb.yaml")


def create_commands(db_url: str) -> str:
    """The two commands that make an APDB at ``db_url`` (for error messages)."""
    shown = redact_url(db_url)
    config = default_config_path(db_url) if sqlite_path(db_url) is not None else Path("apdb.yaml")
    return (
        f"make_apdb.py -c db_url={shlex.quote(shown)}"
        + (" -c isolation_level=READ_UNCOMMITTED" if sqlite_path(db_url) is not None else "")
        + f"  (or: apdb-cli create-sql {shlex.quote(shown)} {config})"
    )


# -- creation ------------------------------------------------------------------------


@dataclass
class CreatedApdb:
    """What `create_apdb` made."""

    db_url: str  #: normalized URL (may hold a password: do not print; use `redact_url`)
    config_path: Path | None  #: the APDB config YAML written (None if not written)
    tables: list[str]  #: tables now in the database
    schema_version: str  #: APDB schema version recorded in the metadata table


def _validate_isolation(db_url: str, isolation_level: str | None) -> None:
    allowed = {None, "READ_COMMITTED", "READ_UNCOMMITTED", "REPEATABLE_READ", "SERIALIZABLE"}
    if isolation_level not in allowed:
        raise ValueError(f"isolation_level={isolation_level!r}; allowed: {sorted(a for a in allowed if a)}")
    if sqlite_path(db_url) is not None and isolation_level not in _SQLITE_ISOLATION:
        raise ValueError(
            f"isolation_level={isolation_level} is not supported by sqlite; use READ_UNCOMMITTED (the guide's "
            "setting and dax_apdb's sqlite default) or SERIALIZABLE"
        )


def _existing_tables(engine, namespace: str | None) -> list[str]:
    import sqlalchemy

    return sorted(sqlalchemy.inspect(engine).get_table_names(schema=namespace))


def _url_with_db_auth(url: str) -> str:
    """The URL with the password from the db-auth file (as dax_apdb connects); never logged.

    sqlite URLs and URLs with no db-auth entry are returned unchanged.
    """
    if url.startswith("sqlite"):
        return url
    from lsst.utils.db_auth import DbAuth, DbAuthError

    try:
        return DbAuth().getUrl(url)
    except DbAuthError:
        return url


def create_apdb(
    db_url: str,
    *,
    isolation_level: str | None = None,
    connection_timeout: float | None = None,
    namespace: str | None = None,
    prefix: str | None = None,
    schema_file: str | None = None,
    read_sources_months: int | None = None,
    read_forced_sources_months: int | None = None,
    config_path: str | os.PathLike | None = None,
    drop: bool = False,
) -> CreatedApdb:
    """Make an empty APDB exactly as ``apdb-cli create-sql`` does, and save its config.

    Parameters
    ----------
    db_url : `str`
        ``sqlite:////abs/path/run1.db`` (file created; its folder must exist) or
        ``postgresql://user@host/dbname`` (the database must exist; the tables
        go into its default schema, or ``namespace``).
    isolation_level, connection_timeout : optional
        Connection settings saved in the config YAML (and checked by
        diaPipe against its own ``apdb.isolation_level``).
    namespace, prefix, schema_file, read_sources_months, read_forced_sources_months : optional
        As ``apdb-cli create-sql`` options; defaults are dax_apdb's.
    config_path : path-like, optional
        Where to write the APDB config YAML; default `default_config_path`
        for sqlite; for a server URL, nothing is written unless given.
    drop : `bool`
        Drop existing APDB tables first. Without it, an existing APDB is an
        error: the guide's rule is a fresh, empty APDB per run.

    Returns
    -------
    created : `CreatedApdb`
    """
    import sqlalchemy

    from lsst.dax.apdb import ApdbSql
    from lsst.dax.apdb.sql.config import ApdbSqlConnectionConfig

    url = normalize_db_url(db_url)
    _validate_isolation(url, isolation_level)
    shown = redact_url(url)
    db_file = sqlite_path(url)
    if db_file is not None:
        if not db_file.parent.is_dir():
            raise ApdbAccessError(f"cannot create {shown}: folder {db_file.parent} does not exist")
        if config_path is None:
            config_path = default_config_path(url)
    # Refuse to "create" over an existing APDB (apdb-cli would silently reuse its tables).
    engine = sqlalchemy.create_engine(_url_with_db_auth(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect():
            pass
        existing = _existing_tables(engine, namespace)
    except sqlalchemy.exc.OperationalError as err:
        raise ApdbAccessError(
            f"cannot connect to {shown}: {str(err.orig).splitlines()[0] if err.orig else err}"
            + ("" if db_file is not None else " (a PostgreSQL APDB needs an existing database)")
        ) from None
    finally:
        engine.dispose()
    prefixed_meta = f"{prefix or ''}metadata"
    if prefixed_meta in existing and not drop:
        raise ApdbAccessError(
            f"an APDB already exists at {shown} (tables {existing}); the guide's rule is one new, empty "
            "APDB per run: choose a new db_url, or pass --drop to delete its contents"
        )

    kwargs = dict(
        schema_file=schema_file,
        read_sources_months=read_sources_months,
        read_forced_sources_months=read_forced_sources_months,
        namespace=namespace,
        prefix=prefix,
        drop=drop,
    )
    config = ApdbSql.init_database(url, **{k: v for k, v in kwargs.items() if v is not None})
    if isolation_level is not None or connection_timeout is not None:
        # A new object (not attribute edits) so that config.save() writes it (exclude_unset).
        config.connection_config = ApdbSqlConnectionConfig(
            **{k: v for k, v in (("isolation_level", isolation_level), ("connection_timeout", connection_timeout))
               if v is not None}
        )

    apdb = ApdbSql(config)
    settings = {"isolation_level": isolation_level, "namespace": namespace, "prefix": prefix or ""}
    apdb.metadata.set(METADATA_KEY, json.dumps(settings, sort_keys=True), force=True)
    schema_version = apdb.metadata.get(ApdbSql.metadataSchemaVersionKey) or "?"
    engine = sqlalchemy.create_engine(_url_with_db_auth(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = _existing_tables(engine, namespace)
    finally:
        engine.dispose()
    del apdb

    written = None
    if config_path is not None:
        written = Path(config_path).expanduser().resolve()
        if url_has_password(config.db_url):
            # Never write a password into a file we create: dax_apdb finds it in db-auth.yaml.
            config.db_url = _make_url(config.db_url).set(password=None).render_as_string(hide_password=False)
        config.save(str(written))
    return CreatedApdb(db_url=url, config_path=written, tables=tables, schema_version=schema_version)


# -- opening ---------------------------------------------------------------------------


def _same_database(url_a: str, url_b: str) -> bool:
    pa, pb = sqlite_path(url_a), sqlite_path(url_b)
    if pa is not None or pb is not None:
        return pa == pb
    a, b = _make_url(url_a), _make_url(url_b)
    return (a.host, a.port, a.database) == (b.host, b.port, b.database)


def _load_config_file(config_url: str):
    from lsst.dax.apdb import ApdbConfig

    try:
        return ApdbConfig.from_uri(config_url)
    except FileNotFoundError as err:
        raise ApdbNotFoundError(
            f"APDB config file {config_url} does not exist: make the APDB with "
            f"`apdb-cli create-sql sqlite:////abs/path/apdb.db {config_url}` (or `make_apdb.py -c "
            "db_url=sqlite:////abs/path/apdb.db`, then set apdb.db_url instead)"
        ) from err
    except Exception as err:
        raise ApdbAccessError(f"cannot read APDB config file {config_url}: {err}") from err


def open_apdb(
    *,
    config_url: str | None = None,
    db_url: str | None = None,
    isolation_level: str | None = None,
    connection_timeout: float | None = None,
    namespace: str | None = None,
    prefix: str | None = None,
):
    """Open an existing APDB from today's config file or the guide's db_url.

    Parameters
    ----------
    config_url : `str`, optional
        APDB config YAML (``apdb-cli create-sql`` output, or the file
        make_apdb wrote).
    db_url : `str`, optional
        Database URL (the guide's ``apdb.db_url``); the config YAML beside an
        sqlite database is used when present.
    isolation_level, connection_timeout, namespace, prefix : optional
        Override the connection settings; an isolation level different from
        the one make_apdb recorded is an `ApdbConfigMismatchError`.

    Returns
    -------
    apdb : `lsst.dax.apdb.Apdb`

    Raises
    ------
    ApdbNotFoundError, ApdbSchemaMismatchError, ApdbConfigMismatchError, ApdbAccessError
    """
    import sqlalchemy

    from lsst.dax.apdb import Apdb, ApdbSqlConfig, IncompatibleVersionError

    if (config_url is None) == (db_url is None):
        raise ValueError("give exactly one of config_url (apdb_config_url) and db_url (apdb.db_url)")
    if config_url is not None:
        config = _load_config_file(config_url)
        where = f"config {config_url}"
        if not isinstance(config, ApdbSqlConfig):
            raise ApdbAccessError(f"{where} is a {type(config).__name__}; diapipe supports SQL APDBs only")
    else:
        url = normalize_db_url(db_url)
        where = redact_url(url)
        sidecar = default_config_path(url)
        if sidecar is not None and sidecar.exists():
            config = _load_config_file(str(sidecar))
            if not isinstance(config, ApdbSqlConfig) or not _same_database(config.db_url, url):
                raise ApdbConfigMismatchError(
                    f"{sidecar} (the APDB config beside the database) names "
                    f"{redact_url(getattr(config, 'db_url', '?'))}, not {where}; remove the stale file or "
                    "set apdb_config_url to the right one"
                )
        else:
            from lsst.dax.apdb import ApdbSql

            config = ApdbSqlConfig(db_url=ApdbSql._update_sqlite_url(url) if sqlite_path(url) else url)
    if namespace is not None:
        config.namespace = namespace
    if prefix is not None:
        config.prefix = prefix
    if isolation_level is not None:
        _validate_isolation(config.db_url, isolation_level)
        config.connection_config.isolation_level = isolation_level
    if connection_timeout is not None:
        config.connection_config.connection_timeout = float(connection_timeout)

    db_file = sqlite_path(config.db_url)
    if db_file is not None and not db_file.exists():
        raise ApdbNotFoundError(
            f"no APDB at {db_file} ({where}): the APDB must exist and be empty before the first run; "
            f"make it with: {create_commands(f'sqlite:///{db_file}')}"
        )
    try:
        apdb = Apdb.from_config(config)
    except IncompatibleVersionError as err:
        from lsst.dax.apdb import ApdbSql

        raise ApdbSchemaMismatchError(
            f"the APDB at {where} was made with another schema or dax_apdb version ({err}); this diapipe "
            f"writes schema {_installed_schema_version()} with dax_apdb code {ApdbSql.apdbImplementationVersion()}: "
            f"make a new APDB with: {create_commands(config.db_url)}"
        ) from None
    except sqlalchemy.exc.NoSuchTableError:
        raise ApdbNotFoundError(
            f"the database at {where} is not an APDB (no '{config.prefix}metadata' table); make one with: "
            f"{create_commands(config.db_url)}"
        ) from None
    except sqlalchemy.exc.OperationalError as err:
        first = str(err.orig).splitlines()[0] if err.orig is not None else type(err).__name__
        raise ApdbNotFoundError(
            f"cannot open the APDB at {where} ({first}); if it does not exist, make it with: "
            f"{create_commands(config.db_url)}"
        ) from None

    recorded = apdb.metadata.get(METADATA_KEY)
    if recorded and isolation_level is not None:
        made = json.loads(recorded).get("isolation_level")
        if made is not None and made != isolation_level:
            raise ApdbConfigMismatchError(
                f"apdb.isolation_level={isolation_level} but the APDB at {where} was made with "
                f"isolation_level={made} (make_apdb.py -c isolation_level={made}); the pipeline's APDB "
                "settings must match those used with make_apdb.py"
            )
    return apdb


def _installed_schema_version() -> str:
    from lsst.dax.apdb.apdbSchema import ApdbSchema
    from lsst.dax.apdb import ApdbSqlConfig

    defaults = ApdbSqlConfig(db_url="sqlite://")
    return str(ApdbSchema(defaults.schema_file, defaults.ss_schema_file).schemaVersion())
