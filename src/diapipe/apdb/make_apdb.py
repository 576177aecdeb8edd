"""``make_apdb.py``: the guide's APDB-creation command.

::

    make_apdb.py -c isolation_level=READ_UNCOMMITTED -c db_url="sqlite:////abs/path/run1.db"
    make_apdb.py -c db_url="postgresql://USER@DB_ADDRESS/DB_NAME"

Makes the same APDB as ``apdb-cli create-sql DB_URL apdb.yaml`` (dax_apdb's
``ApdbSql.init_database``), and writes the APDB config YAML beside an sqlite
database (``/abs/path/run1.apdb.yaml``; ``-c config_file=PATH`` to choose, the
only way to get one for PostgreSQL) so that both today's ``apdb_config_url``
and the guide's ``apdb.db_url`` find it. ``postgresql://`` URLs are rewritten to
``postgresql+psycopg2://``; the schema goes into the existing database's
default schema (or ``-c namespace=NAME``). Passwords are never printed: keep
them out of the URL, in ``~/.lsst/db-auth.yaml`` or ``~/.pgpass``.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse_settings", "SETTINGS"]

#: ``-c key=value`` settings understood, with their types.
SETTINGS = {
    "db_url": str,
    "isolation_level": str,
    "connection_timeout": float,
    "namespace": str,
    "prefix": str,
    "schema_file": str,
    "read_sources_months": int,
    "read_forced_sources_months": int,
    "config_file": str,
}


def parse_settings(items: list[str]) -> dict:
    """``["key=value", ...]`` → typed dict; unknown keys raise naming the allowed ones."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        # pex_config-style prefixes (apdb.db_url, config.db_url) are accepted.
        for head in ("config.", "apdb."):
            if key.startswith(head):
                key = key[len(head) :]
        if not sep:
            raise ValueError(f"-c {item!r}: expected key=value")
        if key not in SETTINGS:
            raise ValueError(f"-c {item.split('=')[0]!r}: unknown setting; known: {', '.join(SETTINGS)}")
        value = value.strip().strip("'\"")
        try:
            out[key] = SETTINGS[key](value)
        except ValueError:
            raise ValueError(f"-c {key}={value!r}: not a valid {SETTINGS[key].__name__}") from None
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_apdb.py",
        description="Create an empty APDB (same as `apdb-cli create-sql`), the guide's way.",
        epilog="Example: make_apdb.py -c isolation_level=READ_UNCOMMITTED -c db_url=sqlite:////abs/path/run1.db",
    )
    parser.add_argument(
        "-c",
        "--config",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"APDB setting; keys: {', '.join(SETTINGS)} (db_url is required)",
    )
    parser.add_argument("--drop", action="store_true", help="Drop the tables of an existing APDB first.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    from .connection import ApdbAccessError, create_apdb, redact_url

    args = _parser().parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as err:
        print(f"make_apdb.py: error: {err}", file=sys.stderr)
        return 2
    db_url = settings.pop("db_url", None)
    if not db_url:
        print("make_apdb.py: error: -c db_url=... is required (e.g. sqlite:////abs/path/run1.db)", file=sys.stderr)
        return 2
    config_file = settings.pop("config_file", None)
    try:
        created = create_apdb(db_url, config_path=config_file, drop=args.drop, **settings)
    except (ApdbAccessError, ValueError) as err:
        print(f"make_apdb.py: error: {err}", file=sys.stderr)
        return 1
    shown = redact_url(created.db_url)
    print(f"Created APDB (schema {created.schema_version}) at {shown}")
    print(f"  tables: {', '.join(created.tables)}")
    if settings.get("isolation_level"):
        print(f"  isolation_level: {settings['isolation_level']}")
    if created.config_path is not None:
        print(f"  APDB config: {created.config_path}")
    print("Use it in a pipeline with either of:")
    print(f"  apdb.db_url: '{shown}'" + (
        f"\n  apdb.isolation_level: {settings['isolation_level']}" if settings.get("isolation_level") else ""))
    if created.config_path is not None:
        print(f"  apdb_config_url: '{created.config_path}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
