"""SIGKILL of ``pipetask run -j 2`` mid-run, then the documented resume
(``--extend-run --skip-existing-in OUTPUT --clobber-outputs``, same -i/-o/-p/-c/-d):
the final APDB / outputs equal those of an uninterrupted run on the same inputs."""

from __future__ import annotations

import glob

import numpy as np
import pytest
from _reliability import (
    DETECTOR,
    DIFFIM_COLLECTION,
    INSTRUMENT,
    TEMPLATE_COLLECTION,
    assert_apdb_consistent,
    assert_same_apdb,
    expected_dia_source_ids,
    pipeline_uri,
    read_apdb,
    run_and_kill,
    run_pipetask,
    run_subset,
    sqlite_count,
    unique,
    visit_order,
    visits_where,
)

pytestmark = pytest.mark.slow

APPIPE_TAIL = "ApPipe.yaml#diaPipe"


def resume_args(args: list[str], output: str) -> list[str]:
    """The documented resume: the same command plus these three options."""
    return [*args, "--extend-run", "--skip-existing-in", output, "--clobber-outputs"]


def test_kill_appipe_during_store_then_resume(diffim_repo, science_visits, tmp_path):
    """Kill (whole process group) the moment the first detector-visit is in the APDB, i.e.
    after diaPipe's store and before its apdb_marker (the other worker mid-quantum);
    resume; compare with diaPipe run uninterrupted in the same
    visit order on the fixture's difference images."""
    from diapipe.apdb import create_apdb

    db = tmp_path / "killed.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    output = unique("kill_appipe")
    args = [
        "run", "-j", "2", "-b", str(diffim_repo), "-i", DIFFIM_COLLECTION, "-o", output,
        "-p", pipeline_uri(APPIPE_TAIL),
        "-c", f"diaPipe:apdb.db_url=sqlite:///{db}", "-c", "diaPipe:apdb.isolation_level=READ_UNCOMMITTED",
        "-d", visits_where(science_visits), "--register-dataset-types",
    ]
    killed = run_and_kill(args, tmp_path / "killed.log", lambda: sqlite_count(db, "DiaSource") > 0)
    assert killed, "the run finished before the kill point"
    stored_at_kill = set(visit_order(db))
    markers_at_kill = glob.glob(f"{diffim_repo}/{output}/*/apdb_marker/**/*", recursive=True)
    assert len(stored_at_kill) >= 1 and len(stored_at_kill) < len(science_visits)

    code = run_pipetask(resume_args(args, output), tmp_path / "resume.log")
    log = (tmp_path / "resume.log").read_text()
    assert code == 0, log[-3000:]
    assert "database is locked" not in log
    if not markers_at_kill:
        # the killed quantum stored but wrote no marker: the resume re-ran it and diaPipe skipped it
        for visit in stored_at_kill:
            assert f"the APDB already holds visit={visit}, detector={DETECTOR}: nothing stored" in log

    got = read_apdb(db)
    assert_apdb_consistent(got, expected_dia_source_ids(diffim_repo, science_visits))

    # Uninterrupted reference: diaPipe alone, visit by visit in the order the killed run stored them.
    order = visit_order(db)
    assert sorted(order) == sorted(science_visits)
    ref_db = tmp_path / "reference.db"
    create_apdb(f"sqlite:///{ref_db}", isolation_level="READ_UNCOMMITTED")
    ref_output = unique("kill_appipe_ref")
    for visit in order:
        run_subset(
            diffim_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=ref_output,
            where=visits_where([visit]),
            config_overrides={"diaPipe": {"apdb.db_url": f"sqlite:///{ref_db}",
                                          "apdb.isolation_level": "READ_UNCOMMITTED"}},
        )
    assert_same_apdb(got, read_apdb(ref_db))


@pytest.mark.xfail(
    strict=False,
    reason="on the loaded 2-core machine the first warp file appeared only after every quantum had finished, "
    "so the resume found an empty QuantumGraph (pipetask exit 1); kill trigger to be reworked",
)
def test_kill_aptemplate_then_resume(diffim_repo, tmp_path):
    """Kill ApTemplate's makeWarp/assembleCoadd -j 2 run when the first warp is
    written; resume; goodSeeingCoadd pixels equal the fixture's uninterrupted
    ApTemplate run."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(diffim_repo), collections=[TEMPLATE_COLLECTION])
    selected = butler.get("goodSeeingVisits", skymap="DC2", tract=3828, patch=24, band="g", instrument=INSTRUMENT)
    visits = sorted(int(v) for v in (selected.keys() if hasattr(selected, "keys") else selected))
    output = unique("kill_aptemplate")
    args = [
        "run", "-j", "2", "-b", str(diffim_repo), "-i", TEMPLATE_COLLECTION, "-o", output,
        "-p", pipeline_uri("ApTemplate.yaml#makeWarp,assembleCoadd"),
        "-d", f"skymap='DC2' AND tract=3828 AND patch=24 AND band='g' AND {visits_where(visits)}",
        "--register-dataset-types",
    ]
    warps = f"{diffim_repo}/{output}/*/deepCoadd_directWarp/**/*.*"
    killed = run_and_kill(args, tmp_path / "killed.log", lambda: bool(glob.glob(warps, recursive=True)))
    assert killed, "the run finished before the kill point"
    code = run_pipetask(resume_args(args, output), tmp_path / "resume.log")
    assert code == 0, (tmp_path / "resume.log").read_text()[-3000:]

    got = Butler.from_config(str(diffim_repo), collections=[output])
    coadd_id = {"skymap": "DC2", "tract": 3828, "patch": 24, "band": "g"}
    a, b = got.get("goodSeeingCoadd", **coadd_id), butler.get("goodSeeingCoadd", **coadd_id)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.variance, b.variance)
    np.testing.assert_array_equal(
        got.get("goodSeeingCoadd_nImage", **coadd_id).image, butler.get("goodSeeingCoadd_nImage", **coadd_id).image
    )
