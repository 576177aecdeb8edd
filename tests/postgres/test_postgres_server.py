"""The private PostgreSQL server, its db-auth credentials, and a PostgreSQL APDB."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import yaml
from postgres_fixtures import postgres_available


def _passwords(server):
    return [entry["password"] for entry in yaml.safe_load(server.auth_file.read_text())]


def test_listens_on_localhost_only_with_passwords(postgres_server):
    import psycopg2

    server = postgres_server
    conn = server.connect(superuser=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW listen_addresses")
            assert cur.fetchone()[0] == "127.0.0.1"
            cur.execute("SHOW unix_socket_directories")
            assert cur.fetchone()[0] == ""
            cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (server.user,))
            assert cur.fetchone() == (False,)
    finally:
        conn.close()
    # the hand-out URL carries no password, and without one the server refuses us
    url = server.url("postgres")
    assert "@127.0.0.1:" in url and ":" not in url.split("://")[1].split("@")[0]
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host="127.0.0.1", port=server.port, user=server.user, dbname="postgres", password="")
    # the db-auth file: mode 600, one entry per role, patterns DbAuth understands
    mode = stat.S_IMODE(os.stat(server.auth_file).st_mode)
    assert mode == 0o600, oct(mode)
    from lsst.utils.db_auth import DbAuth

    user, password = DbAuth().getAuth("postgresql+psycopg2", server.user, "127.0.0.1", server.port, "anydb")
    assert user == server.user and len(password) >= 24
    # pg_hba: only 127.0.0.1, only SCRAM
    hba = [line.split() for line in (server.data_dir / "pg_hba.conf").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert hba == [["host", "all", "all", "127.0.0.1/32", "scram-sha-256"]]


def test_registry_database_has_btree_gist(postgres_server):
    postgres_server.create_database("gist_check", btree_gist=True)
    try:
        conn = postgres_server.connect("gist_check")
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT extname FROM pg_extension")
                assert "btree_gist" in {row[0] for row in cur.fetchall()}
        finally:
            conn.close()
    finally:
        postgres_server.drop_database("gist_check")


def test_apdb_in_postgres_from_db_auth(postgres_server, tmp_path):
    """dax_apdb makes and opens an APDB whose URL has no password (db-auth supplies it)."""
    import pandas as pd
    from lsst.dax.apdb import Apdb

    from diapipe.apdb import open_apdb

    url = postgres_server.create_database("apdb_unit")
    config = tmp_path / "apdb.yaml"
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "apdb-cli"), "create-sql", url, str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert not any(pw in config.read_text() for pw in _passwords(postgres_server))
    apdb = Apdb.from_uri(str(config))
    assert apdb.getDiaObjects(_small_region()).empty
    # diapipe's own opener, given the guide's db_url
    apdb2 = open_apdb(db_url=postgres_server.url("apdb_unit", driver=None))
    assert isinstance(apdb2.getDiaObjects(_small_region()), pd.DataFrame)


def test_make_apdb_guide_command(postgres_server):
    """The guide's ``make_apdb.py -c db_url="postgresql://USER@HOST/DB"`` on our server."""
    url = postgres_server.create_database("apdb_guide")
    bare = postgres_server.url("apdb_guide", driver=None)
    assert bare.startswith("postgresql://")
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "make_apdb.py"), "-c", f"db_url={bare}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not any(pw in result.stdout + result.stderr for pw in _passwords(postgres_server))
    import sqlalchemy
    from lsst.utils.db_auth import DbAuth

    engine = sqlalchemy.create_engine(DbAuth().getUrl(url))
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"DiaObject", "DiaSource", "DiaForcedSource", "metadata"} <= tables


def _small_region():
    from lsst.sphgeom import Angle, Circle, LonLat, UnitVector3d

    return Circle(UnitVector3d(LonLat.fromDegrees(56.6, -36.4)), Angle.fromDegrees(0.01))


@pytest.mark.skipif(postgres_available() is not None, reason="PostgreSQL server binaries unavailable")
def test_lifecycle_restart_and_remove(tmp_path):
    """start → stop → start again (same data, same credentials) → stop --remove."""
    from diapipe.apdb.postgres_server import load_server, main, start_server

    auth_file = tmp_path / "auth.yaml"
    server = start_server(tmp_path / "pg", auth_file=auth_file, databases=("keep",), durable=False)
    try:
        conn = server.connect("keep")
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
        conn.close()
        assert main(["stop", str(tmp_path / "pg")]) == 0
        assert not load_server(tmp_path / "pg").is_running()
        server = start_server(tmp_path / "pg", auth_file=auth_file)
        conn = server.connect("keep")
        with conn.cursor() as cur:
            cur.execute("SELECT x FROM t")
            assert cur.fetchone() == (42,)
        conn.close()
    finally:
        cluster = server.cluster_dir
        server.stop(remove=True)
    assert not cluster.exists() and not (tmp_path / "pg" / "server.json").exists()
    assert yaml.safe_load(auth_file.read_text()) in ([], None)
