"""No PostgreSQL password in logs, task metadata, configs or outputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from _reliability import DETECTOR, DIFFIM_COLLECTION, run_subset, unique, visits_where

pytestmark = pytest.mark.slow

PASSWORD = "s3cr3t-Pa55word-for-tests"


def _scan(folder: Path, secret: str) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        if path.is_file() and secret.encode() in path.read_bytes():
            hits.append(str(path))
    return hits


def test_password_not_leaked_on_connection_failure(diffim_repo, science_visits, tmp_path, monkeypatch, caplog):
    """db-auth supplies a password for a server that is not there: the error and logs
    name the URL without the password."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free, nothing listens
    auth = tmp_path / "db-auth.yaml"
    auth.write_text(f"- url: postgresql://diapipe@127.0.0.1:{port}/apdb\n  password: {PASSWORD}\n")
    auth.chmod(0o600)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LSST_DB_AUTH", str(auth))
    url = f"postgresql://diapipe@127.0.0.1:{port}/apdb"
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as info:
        run_subset(diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=unique("pw_fail"),
                   where=visits_where(science_visits[:1]),
                   config_overrides={"diaPipe": {"apdb.db_url": url, "alertsPath": str(tmp_path / "alerts")}})
    text = "".join(str(e) for e in (info.value, info.value.__cause__, info.value.__context__))
    assert f"127.0.0.1:{port}" in text
    assert PASSWORD not in text and PASSWORD not in caplog.text
    # and a password written into the URL is refused without being echoed
    with pytest.raises(Exception) as info:
        run_subset(diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=unique("pw_url"),
                   where=visits_where(science_visits[:1]),
                   config_overrides={"diaPipe": {"apdb.db_url": f"postgresql://diapipe:{PASSWORD}@127.0.0.1:{port}/apdb"}})
    assert "contains a password" in str(info.value) and PASSWORD not in str(info.value)


def test_password_not_in_outputs_with_server(diffim_repo, science_visits, postgres_server, tmp_path, caplog):
    """A real PostgreSQL APDB (tests/postgres_fixtures.py), password only in the
    session's db-auth file: after a diaPipe run, the password is in no log record,
    metadata, config, marker, alert or file of the output run."""
    from lsst.daf.butler import Butler
    from lsst.dax.apdb import ApdbSql

    from diapipe.apdb.postgres_server import _get_password

    password = _get_password(Path(os.environ["LSST_DB_AUTH"]), postgres_server.user, postgres_server.port)
    assert len(password) >= 8
    postgres_server.create_database("reliability_cred", exist_ok=True)
    url = postgres_server.url("reliability_cred")
    # dax_apdb directly: diapipe's create_apdb pre-connects without db-auth (see docs/reliability.md)
    ApdbSql.init_database(url, drop=True)
    output = unique("pw_server")
    with caplog.at_level(logging.DEBUG):
        run_subset(diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=output,
                   where=visits_where(science_visits[:1]),
                   config_overrides={"diaPipe": {"apdb.db_url": url, "alertsPath": str(tmp_path / "alerts")}})
    assert password not in caplog.text
    butler = Butler.from_config(str(diffim_repo), collections=[output])
    visit = science_visits[0]
    marker = butler.get("apdb_marker", instrument="LSSTCam-imSim", visit=visit, detector=DETECTOR)
    assert marker["numDiaSources"] > 0 and not marker["alreadyInApdb"]
    metadata = butler.get("diaPipe_metadata", instrument="LSSTCam-imSim", visit=visit, detector=DETECTOR)
    assert password not in str(metadata.to_dict() if hasattr(metadata, "to_dict") else metadata)
    assert password not in str(butler.get("diaPipe_config"))
    run = butler.registry.getCollectionChain(output)[0]
    assert _scan(Path(diffim_repo) / run, password) == []
    assert _scan(tmp_path / "alerts", password) == []
