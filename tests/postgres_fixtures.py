"""The ``postgres_server`` session fixture: a private PostgreSQL server for the tests.

Imported by the conftest.py of tests/postgres and tests/bps. Each pytest-xdist
worker that needs it starts its own server (a few seconds: initdb + start, fsync
off) on 127.0.0.1 and a free port, and stops and deletes it at the end of the
session. Passwords go to a db-auth file of the session (``LSST_DB_AUTH`` points to
it for the whole session, subprocesses included).

If the server binaries are missing the tests skip — unless ``DIAPIPE_PG_BIN`` is
set (``./dev`` sets it after installing Debian's postgresql), when missing binaries
are an error: CI must run these tests.
"""

from __future__ import annotations

import os

import pytest

__all__ = ["postgres_available", "postgres_server"]


def postgres_available() -> str | None:
    """None if PostgreSQL's server binaries are usable, else the reason they are not."""
    from diapipe.apdb.postgres_server import PostgresUnavailableError, find_postgres_bin

    try:
        find_postgres_bin()
    except PostgresUnavailableError as err:
        return str(err)
    return None


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A running `diapipe.apdb.postgres_server.PostgresServer` (role ``diapipe``)."""
    from diapipe.apdb.postgres_server import start_server

    reason = postgres_available()
    if reason is not None:
        if os.environ.get("DIAPIPE_PG_BIN"):
            pytest.fail(f"DIAPIPE_PG_BIN={os.environ['DIAPIPE_PG_BIN']} is set but {reason}")
        pytest.skip(f"PostgreSQL tests need the server binaries: {reason}")
    root = tmp_path_factory.mktemp("postgres")
    auth_file = root / "db-auth.yaml"
    previous = os.environ.get("LSST_DB_AUTH")
    os.environ["LSST_DB_AUTH"] = str(auth_file)
    server = start_server(root / "server", auth_file=auth_file, durable=False)
    try:
        yield server
    finally:
        server.stop(remove=True)
        if previous is None:
            os.environ.pop("LSST_DB_AUTH", None)
        else:
            os.environ["LSST_DB_AUTH"] = previous
