"""SIGKILL of ``pipetask run -j 2`` mid-run, then the documented resume
(``--extend-run --skip-existing-in OUTPUT --clobber-outputs``, same -i/-o/-p/-c/-d):
the final APDB / outputs equal those of an uninterrupted run on the same inputs."""

from __future__ import annotations

import glob
import os
import re
import time

import numpy as np
import pytest
from _reliability import (
    DEFAULTS,
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


def assert_alerts_exactly_once(folder, visits, expected_ids) -> None:
    """One published alert file per detector-visit, no pending file left, every expected
    DiaSource in exactly one packet."""
    from diapipe.alerts import read_alerts

    assert not list(folder.glob("*.pending")), "a pending alert file was left behind"
    files = sorted(folder.glob("*.avro"))
    assert [f.name for f in files] == sorted(f"{v}_{DETECTOR}.avro" for v in visits)
    alert_ids = [p["diaSourceId"] for f in files for p in read_alerts(f)]
    assert len(alert_ids) == len(set(alert_ids)), "duplicated alerts"
    assert sorted(alert_ids) == sorted(int(i) for i in expected_ids), "alerts lost or extra"


def test_kill_appipe_during_store_then_resume(diffim_repo, kill_repo, science_visits, tmp_path):
    """Kill (whole process group) the moment the first detector-visit is in the APDB, i.e.
    after diaPipe's store and before its apdb_marker (the other worker mid-quantum);
    resume; compare with diaPipe run uninterrupted in the same
    visit order on the fixture's difference images."""
    from diapipe.apdb import create_apdb

    db = tmp_path / "killed.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    output = unique("kill_appipe")
    args = [
        "run", "-j", "2", "-b", str(kill_repo), "-i", DIFFIM_COLLECTION, "-o", output,
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
    expected_ids = expected_dia_source_ids(diffim_repo, science_visits)
    assert_apdb_consistent(got, expected_ids)
    assert_alerts_exactly_once(db.with_name("killed_alerts"), science_visits, expected_ids)

    # Uninterrupted reference: diaPipe alone, visit by visit in the order the killed run stored them.
    order = visit_order(db)
    assert sorted(order) == sorted(science_visits)
    ref_db = tmp_path / "reference.db"
    create_apdb(f"sqlite:///{ref_db}", isolation_level="READ_UNCOMMITTED")
    ref_output = unique("kill_appipe_ref")
    for visit in order:
        run_subset(
            kill_repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=ref_output,
            where=visits_where([visit]),
            config_overrides={"diaPipe": {"apdb.db_url": f"sqlite:///{ref_db}",
                                          "apdb.isolation_level": "READ_UNCOMMITTED"}},
        )
    assert_same_apdb(got, read_apdb(ref_db))


def _inputs_only_collection(repo, spec: str, source: str) -> str:
    """A new TAGGED collection holding only the overall inputs of pipeline ``spec`` found in
    ``source``, not the outputs of its tasks.

    ``u/test/templates`` already holds this pipeline's outputs (the fixture ran ApTemplate
    into it). With it as ``-i``, the resume's ``--skip-existing-in OUTPUT`` (OUTPUT being the
    chain that includes the inputs) finds every quantum's metadata there and builds an
    empty graph, whatever the killed run did: what a user re-making a template from calexps
    meets is an input without warps and coadds, which this collection is.
    """
    from lsst.daf.butler import Butler, CollectionType
    from lsst.pipe.base import Pipeline

    butler = Butler.from_config(str(repo), writeable=True)
    graph = Pipeline.from_uri(os.path.expandvars(pipeline_uri(spec))).to_graph()
    graph.resolve(butler.registry)
    name = unique("aptemplate_inputs")
    butler.registry.registerCollection(name, CollectionType.TAGGED)
    for dataset_type, _ in graph.iter_overall_inputs():
        refs = butler.query_datasets(dataset_type, collections=source, find_first=True, limit=None)
        assert refs, f"no {dataset_type} in {source}"
        butler.registry.associate(name, refs)
    return name


def _count_datasets(repo, dataset_type: str, collection: str) -> int:
    """Datasets of ``dataset_type`` the registry holds in ``collection`` (a fresh butler:
    it sees what other processes committed; 0 while the collection does not exist)."""
    from lsst.daf.butler import Butler
    from lsst.daf.butler.registry import MissingCollectionError

    try:
        return len(Butler.from_config(str(repo)).query_datasets(dataset_type, collections=collection, explain=False))
    except MissingCollectionError:
        return 0


def test_kill_aptemplate_then_resume(diffim_repo, kill_repo, tmp_path):
    """SIGKILL ApTemplate's makeWarp/assembleCoadd ``-j 2`` run as soon as the registry
    records the first finished makeWarp quantum (its ``makeWarp_metadata``; the file system
    is polled every 50 ms and the registry asked once that file exists). The coadd needs
    all 6 warps, so the kill always lands mid-run, however loaded the machine: at least one
    quantum done, the coadd not. Resume the documented way: exactly the unfinished makeWarp
    quanta and assembleCoadd run, and goodSeeingCoadd image, mask, variance and nImage are
    bit-identical to the fixture's uninterrupted ApTemplate run."""
    from lsst.daf.butler import Butler

    spec = "ApTemplate.yaml#makeWarp,assembleCoadd"
    butler = Butler.from_config(str(kill_repo), collections=[TEMPLATE_COLLECTION])
    selected = butler.get("goodSeeingVisits", skymap="DC2", tract=3828, patch=24, band="g", instrument=INSTRUMENT)
    visits = sorted(int(v) for v in (selected.keys() if hasattr(selected, "keys") else selected))
    inputs = _inputs_only_collection(kill_repo, spec, TEMPLATE_COLLECTION)
    output = unique("kill_aptemplate")
    args = [
        "run", "-j", "2", "-b", str(kill_repo), "-i", inputs, "-o", output,
        "-p", pipeline_uri(spec),
        "-d", f"skymap='DC2' AND tract=3828 AND patch=24 AND band='g' AND {visits_where(visits)}",
        "--register-dataset-types",
    ]
    # files land under the datastore root, which is the shared repository's
    metadata_files = f"{diffim_repo}/{output}/*/makeWarp_metadata/**/*.json"
    coadd_files = f"{diffim_repo}/{output}/*/goodSeeingCoadd/**/*.fits"

    def first_quantum_recorded() -> bool:
        return bool(glob.glob(metadata_files, recursive=True)) and _count_datasets(
            kill_repo, "makeWarp_metadata", output) > 0

    t0 = time.monotonic()
    killed = run_and_kill(args, tmp_path / "killed.log", first_quantum_recorded)
    kill_s = time.monotonic() - t0
    assert killed, "the run finished before the kill point"
    n_done = _count_datasets(kill_repo, "makeWarp_metadata", output)
    assert 1 <= n_done < len(visits), n_done
    assert not glob.glob(coadd_files, recursive=True), "the coadd was written before the kill"

    t1 = time.monotonic()
    code = run_pipetask(resume_args(args, output), tmp_path / "resume.log")
    resume_s = time.monotonic() - t1
    log = (tmp_path / "resume.log").read_text()
    assert code == 0, log[-3000:]
    # the resume ran exactly the quanta the killed run had not finished
    made = re.search(r"Generated (\d+) quanta? for task makeWarp", log)
    n_rerun = int(made.group(1)) if made else 0
    assert n_rerun == len(visits) - n_done, log[-3000:]
    assert "Generated 1 quantum for task assembleCoadd" in log
    print(f"killed after {kill_s:.1f} s with {n_done} makeWarp quanta recorded; the resume ran {n_rerun} "
          f"makeWarp quanta + assembleCoadd in {resume_s:.1f} s")

    got = Butler.from_config(str(kill_repo), collections=[output])
    coadd_id = {"skymap": "DC2", "tract": 3828, "patch": 24, "band": "g"}
    a, b = got.get("goodSeeingCoadd", **coadd_id), butler.get("goodSeeingCoadd", **coadd_id)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.variance, b.variance)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(
        got.get("goodSeeingCoadd_nImage", **coadd_id).image, butler.get("goodSeeingCoadd_nImage", **coadd_id).image
    )


def test_kill_appipe_during_subtraction_then_resume(diffim_repo, kill_repo, science_visits, tmp_path):
    """Kill (whole process group) the moment a subtractImages quantum starts executing
    (its start line in pipetask's log), in a run of the diffim subset plus diaPipe from
    raws; resume; the APDB then holds exactly the DiaSources of the fixture's uninterrupted
    ``ApPipe.yaml#diffim`` run (same inputs, deterministic), one alert file per visit."""
    from diapipe.apdb import create_apdb

    db = tmp_path / "killed.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    output = unique("kill_subtract")
    args = [
        "run", "-j", "2", "-b", str(kill_repo), "-i", f"{TEMPLATE_COLLECTION},{DEFAULTS}", "-o", output,
        "-p", pipeline_uri("ApPipe.yaml#diffim,diaPipe"),
        "-c", f"diaPipe:apdb.db_url=sqlite:///{db}", "-c", "diaPipe:apdb.isolation_level=READ_UNCOMMITTED",
        "-d", visits_where(science_visits), "--register-dataset-types",
    ]
    log_path = tmp_path / "killed.log"
    started = re.compile(r"executing quantum for label=subtractImages")

    def subtraction_running() -> bool:
        return log_path.exists() and started.search(log_path.read_text(errors="replace")) is not None

    killed = run_and_kill(args, log_path, subtraction_running, timeout_s=600.0)
    assert killed, "the run finished before the kill point"
    assert _count_datasets(kill_repo, "goodSeeingDiff_diaSrcTable", output) < len(science_visits)
    assert sqlite_count(db, "DiaSource", "") == 0 or len(set(visit_order(db))) < len(science_visits)

    code = run_pipetask(resume_args(args, output), tmp_path / "resume.log")
    log = (tmp_path / "resume.log").read_text()
    assert code == 0, log[-3000:]
    assert _count_datasets(kill_repo, "goodSeeingDiff_diaSrcTable", output) == len(science_visits)
    expected_ids = expected_dia_source_ids(diffim_repo, science_visits)
    assert_apdb_consistent(read_apdb(db), expected_ids)
    assert_alerts_exactly_once(db.with_name("killed_alerts"), science_visits, expected_ids)
