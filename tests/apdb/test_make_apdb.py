"""make_apdb.py versus apdb-cli, felis diff against the shipped schema, and the
clear errors of a missing / mismatched APDB."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import sqlalchemy

from diapipe.apdb import (
    ApdbConfigMismatchError,
    ApdbNotFoundError,
    ApdbSchemaMismatchError,
    create_apdb,
    default_config_path,
    normalize_db_url,
    open_apdb,
    redact_url,
)
from diapipe.apdb.make_apdb import main as make_apdb_main

BIN = Path(sys.executable).parent


def _layout(db_file: Path) -> dict:
    """{table: (sorted columns with type/nullability, sorted index definitions)}."""
    engine = sqlalchemy.create_engine(f"sqlite:///{db_file}")
    try:
        insp = sqlalchemy.inspect(engine)
        out = {}
        for table in insp.get_table_names():
            cols = sorted((c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table))
            idx = sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in insp.get_indexes(table))
            pk = tuple(insp.get_pk_constraint(table)["constrained_columns"])
            out[table] = (cols, idx, pk)
        return out
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One APDB made by make_apdb.py (in-process) and one by apdb-cli create-sql."""
    from lsst.dax.apdb.cli.apdb_cli import main as apdb_cli_main

    root = tmp_path_factory.mktemp("apdbs")
    ours = root / "run1.db"
    status = make_apdb_main(["-c", "isolation_level=READ_UNCOMMITTED", "-c", f'db_url="sqlite:///{ours}"'])
    assert status == 0
    theirs = root / "apdb.db"
    apdb_cli_main(["create-sql", f"sqlite:///{theirs}", str(root / "apdb.yaml")])
    return root, ours, theirs


def test_make_apdb_same_schema_as_apdb_cli(made, capsys):
    root, ours, theirs = made
    a, b = _layout(ours), _layout(theirs)
    assert set(a) == {"DiaObject", "DiaSource", "DiaForcedSource", "DiaObject_To_Object_Match", "metadata"}
    assert a == b
    # Same versions and frozen config in the metadata table.
    get = lambda f: dict(sqlite3.connect(f).execute("select name, value from metadata").fetchall())  # noqa: E731
    ma, mb = get(ours), get(theirs)
    assert ma.pop("diapipe:make_apdb.json")
    assert ma == mb
    assert ma["version:schema"] == "10.0.0"
    # The config YAML beside the database, usable as apdb_config_url.
    sidecar = root / "run1.apdb.yaml"
    assert default_config_path(f"sqlite:///{ours}") == sidecar
    text = sidecar.read_text()
    assert "READ_UNCOMMITTED" in text and "run1.db" in text
    assert type(open_apdb(config_url=str(sidecar))).__name__ == "ApdbSql"
    assert type(open_apdb(config_url=str(root / "apdb.yaml"))).__name__ == "ApdbSql"
    # ...and the apdb-cli one by db_url (no sidecar there): either route, either config.
    assert type(open_apdb(db_url=f"sqlite:///{theirs}", isolation_level="READ_UNCOMMITTED")).__name__ == "ApdbSql"


def test_make_apdb_prints_and_refuses_existing(made, capsys):
    root, ours, _ = made
    assert make_apdb_main(["-c", f"db_url=sqlite:///{ours}"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--drop" in err
    assert make_apdb_main(["-c", "colour=blue"]) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert make_apdb_main(["-c", "isolation_level=READ_UNCOMMITTED"]) == 2
    assert "db_url" in capsys.readouterr().err
    fresh = root / "run2.db"
    assert make_apdb_main(["-c", f"db_url=sqlite:///{fresh}"]) == 0
    out = capsys.readouterr().out
    assert "Created APDB (schema 10.0.0)" in out and "run2.apdb.yaml" in out and "DiaSource" in out


def _felis_differences(db_file: Path) -> str:
    felis = shutil.which("felis", path=str(BIN)) or shutil.which("felis")
    if felis is None:
        pytest.skip("felis CLI not installed")
    schema = resources.files("lsst.sdm.schemas").joinpath("apdb.yaml")
    proc = subprocess.run(
        [felis, "diff", "-E", "--engine-url", f"sqlite:///{db_file}", str(schema)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_felis_diff_only_expected_differences(made):
    """felis diff of the sqlite APDB against apdb.yaml of lsst-sdm-schemas.

    felis reports differences that are not schema errors, and only those are
    allowed: tables dax_apdb does not create in its baseline layout
    (DiaObjectLast, SSO/MPC and summary tables), dax_apdb's own HTM ``pixelId``
    column and index, and sqlite reflecting ``float`` as REAL.
    """
    _, ours, _ = made
    status, out = _felis_differences(ours)
    ops = re.findall(r"\('(add_\w+|remove_\w+|modify_\w+)',", out)
    assert ops, out[-2000:]  # felis did compare
    assert set(ops) <= {"add_table", "add_index", "remove_column", "remove_index", "modify_type"}, set(ops)
    added = set(re.findall(r"\('add_table',\s*Table\('(\w+)'", out))
    # Indexes are added only on the tables that are missing as a whole.
    index_tables = set(re.findall(r"\('add_index',\s*Index\('\w+',\s*Column\([^<]*table=<(\w+)>", out))
    assert ops.count("add_index") == 0 or (index_tables and index_tables <= added), index_tables
    assert not added & {"DiaObject", "DiaSource", "DiaForcedSource", "DiaObject_To_Object_Match", "metadata"}
    assert "DiaObjectLast" in added
    removed_cols = re.findall(r"\('remove_column',\s*None,\s*'(\w+)',\s*Column\('(\w+)'", out)
    assert removed_cols and {c for _, c in removed_cols} == {"pixelId"}
    removed_idx = re.findall(r"\('remove_index',\s*Index\('(\w+)'", out)
    assert all(name.endswith("_pixelId") for name in removed_idx)
    n_type = ops.count("modify_type")
    assert len(re.findall(r"REAL\(\),\s*FLOAT\(\)\)", out)) == n_type
    # A really broken APDB is caught: drop a column and felis reports it.
    broken = ours.with_name("broken.db")
    shutil.copy(ours, broken)
    with sqlite3.connect(broken) as conn:
        conn.execute('ALTER TABLE "DiaSource" DROP COLUMN "psfFluxErr"')
    _, out2 = _felis_differences(broken)
    assert "add_column" in out2 and "psfFluxErr" in out2


def test_missing_apdb_names_the_commands(tmp_path):
    with pytest.raises(ApdbNotFoundError) as info:
        open_apdb(db_url=f"sqlite:///{tmp_path}/nope.db", isolation_level="READ_UNCOMMITTED")
    msg = str(info.value)
    assert "make_apdb.py -c db_url=sqlite:///" in msg and "apdb-cli create-sql" in msg
    with pytest.raises(ApdbNotFoundError, match="apdb-cli create-sql"):
        open_apdb(config_url=str(tmp_path / "apdb.yaml"))
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(ApdbNotFoundError, match="not an APDB"):
        open_apdb(db_url=f"sqlite:///{empty}")


def test_schema_version_mismatch_is_clear(tmp_path):
    db = tmp_path / "old.db"
    create_apdb(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:
        conn.execute("update metadata set value='9.0.0' where name='version:schema'")
    with pytest.raises(ApdbSchemaMismatchError) as info:
        open_apdb(db_url=f"sqlite:///{db}")
    msg = str(info.value)
    assert "9.0.0" in msg and "10.0.0" in msg and "make_apdb.py" in msg


def test_config_mismatch_is_clear(tmp_path):
    db = tmp_path / "r.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    with pytest.raises(ApdbConfigMismatchError, match="isolation_level=READ_UNCOMMITTED"):
        open_apdb(db_url=f"sqlite:///{db}", isolation_level="SERIALIZABLE")
    # A stale config file beside the database naming another database.
    other = tmp_path / "other.db"
    create_apdb(f"sqlite:///{other}")
    shutil.copy(default_config_path(f"sqlite:///{other}"), default_config_path(f"sqlite:///{db}"))
    with pytest.raises(ApdbConfigMismatchError, match="other.db"):
        open_apdb(db_url=f"sqlite:///{db}")
    with pytest.raises(ValueError, match="not supported by sqlite"):
        create_apdb(f"sqlite:///{tmp_path}/x.db", isolation_level="READ_COMMITTED")


def test_urls_and_passwords():
    url = "postgresql://alice:s3cret@db.example.org:5432/apdb"
    assert normalize_db_url(url).startswith("postgresql+psycopg2://alice:s3cret@db.example.org")
    assert "s3cret" not in redact_url(url) and "***" in redact_url(url)
    assert normalize_db_url("postgresql+psycopg2://u@h/d") == "postgresql+psycopg2://u@h/d"
    assert normalize_db_url("sqlite:///rel.db") == f"sqlite:///{Path(os.getcwd()) / 'rel.db'}"
    # Unreachable server: the message redacts the password.
    from diapipe.apdb import ApdbAccessError

    with pytest.raises(ApdbAccessError) as info:
        create_apdb("postgresql://alice:s3cret@127.0.0.1:1/apdb")
    assert "s3cret" not in str(info.value) and "cannot connect" in str(info.value)
