"""Reruns into a populated APDB and repeated ``pipetask run -j 2`` into sqlite."""

from __future__ import annotations

import logging

import pytest
from _reliability import (
    DETECTOR,
    DIFFIM_COLLECTION,
    assert_apdb_consistent,
    assert_same_apdb,
    expected_dia_source_ids,
    pipeline_uri,
    read_apdb,
    run_pipetask,
    run_subset,
    unique,
    visits_where,
)

pytestmark = pytest.mark.slow


def _apdb(tmp_path, name):
    from diapipe.apdb import create_apdb

    db = tmp_path / f"{name}.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    return db


def test_rerun_into_populated_apdb_skips_with_warning(diffim_repo, science_visits, tmp_path, caplog):
    from lsst.daf.butler import Butler

    db = _apdb(tmp_path, "rerun")
    overrides = {"diaPipe": {"apdb.db_url": f"sqlite:///{db}", "apdb.isolation_level": "READ_UNCOMMITTED"}}
    run_subset(diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=unique("rerun1"),
               where=visits_where(science_visits), config_overrides=overrides)
    first = read_apdb(db)
    assert_apdb_consistent(first, expected_dia_source_ids(diffim_repo, science_visits))
    second_output = unique("rerun2")
    with caplog.at_level(logging.WARNING):
        run_subset(diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=second_output,
                   where=visits_where(science_visits), config_overrides=overrides)
    assert_same_apdb(read_apdb(db), first)  # nothing duplicated, nothing changed
    for visit in science_visits:
        message = (f"the APDB already holds visit={visit}, detector={DETECTOR}: nothing stored (rerunning a "
                   "detector-visit would duplicate its DiaSources and DiaObjects). Use a new APDB to reprocess it")
        assert any(message in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), message
        marker = Butler.from_config(str(diffim_repo)).get(
            "apdb_marker", instrument="LSSTCam-imSim", visit=visit, detector=DETECTOR, collections=second_output)
        assert marker["alreadyInApdb"] is True


def test_j2_sqlite_nothing_lost_or_duplicated(diffim_repo, science_visits, tmp_path):
    """``-j 2`` diaPipe into sqlite, with a 5 s sqlite busy timeout so that any lock
    contention the APDB lock did not prevent would surface as 'database is locked'.
    (The kill test's killed and resumed runs are two more -j 2 runs into sqlite,
    checked the same way: one repetition here keeps the suite in its time budget.)"""
    repeat = 1
    db = _apdb(tmp_path, f"j2_{repeat}")
    args = [
        "run", "-j", "2", "-b", str(diffim_repo), "-i", DIFFIM_COLLECTION, "-o", unique(f"j2_{repeat}"),
        "-p", pipeline_uri("ApPipe.yaml#diaPipe"),
        "-c", f"diaPipe:apdb.db_url=sqlite:///{db}", "-c", "diaPipe:apdb.isolation_level=READ_UNCOMMITTED",
        "-c", "diaPipe:apdb.connection_timeout=5",
        "-d", visits_where(science_visits), "--register-dataset-types",
    ]
    code = run_pipetask(args, tmp_path / "j2.log")
    log = (tmp_path / "j2.log").read_text()
    assert code == 0, log[-3000:]
    assert "database is locked" not in log.lower()
    assert f"Executed {len(science_visits)} quanta successfully, 0 failed" in log
    assert_apdb_consistent(read_apdb(db), expected_dia_source_ids(diffim_repo, science_visits))
