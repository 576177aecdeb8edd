"""Bad input: each case fails with a message naming the data ID / file / option,
the other quanta complete, and nothing half-written is left."""

from __future__ import annotations

import glob
import os
import shutil
import sqlite3

import numpy as np
import pytest
from _reliability import (
    DEFAULTS,
    DETECTOR,
    DIFFIM_COLLECTION,
    INSTRUMENT,
    TEMPLATE_COLLECTION,
    pipeline_uri,
    pipetask_inprocess,
    run_subset,
    unique,
    visits_where,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bad_raw_run(diffim_repo, science_visits, tmp_path_factory):
    """Three corrupted copies of science raws in a new RUN, then ``pipetask run -j 1`` of
    isr over those three exposures and one good one (in-process)."""
    from lsst.daf.butler import Butler, DatasetRef, FileDataset

    from diapipe.exposure.exposure import Exposure
    from diapipe.exposure.fits import write_exposure

    work = tmp_path_factory.mktemp("bad_raws")
    butler = Butler.from_config(str(diffim_repo), writeable=True)
    refs = {int(r.dataId["exposure"]): r for r in butler.query_datasets("raw", collections="2.2i/raw/all")}
    good = min(refs)
    truncated, nan_amp, wrong = science_visits[:3]
    run = unique("bad_raws")
    butler.registry.registerRun(run)

    def ingest(exposure_id, path):
        ref = DatasetRef(refs[exposure_id].datasetType, refs[exposure_id].dataId, run=run)
        butler.ingest(FileDataset(path=str(path), refs=[ref], formatter="diapipe.butler.formatters.ExposureFormatter"),
                      transfer="copy")
        return butler.getURI(ref).ospath

    path = work / "truncated.fits"
    shutil.copy(butler.getURI(refs[truncated]).ospath, path)
    os.truncate(path, os.path.getsize(path) // 2)
    files = {"truncated": ingest(truncated, path)}

    raw = butler.get(refs[nan_amp])
    ny, nx = raw.image.shape
    raw.image[: ny // 2, : nx // 8] = np.nan  # amplifier C10, prescan and overscan included
    write_exposure(raw, work / "nan_amp.fits")
    files["nan_amp"] = ingest(nan_amp, work / "nan_amp.fits")

    raw = butler.get(refs[wrong])  # not LSSTCam-imSim: 3 columns short of 8 amplifiers' width
    other = Exposure(image=raw.image[:, :-3].copy(), mask=None if raw.mask is None else raw.mask[:, :-3].copy(),
                     variance=None if raw.variance is None else raw.variance[:, :-3].copy(), wcs=raw.wcs,
                     visit_info=raw.visit_info, metadata=raw.metadata)
    write_exposure(other, work / "wrong.fits")
    files["wrong"] = ingest(wrong, work / "wrong.fits")

    output = unique("bad_isr")
    exposures = [good, truncated, nan_amp, wrong]
    code, log = pipetask_inprocess([
        "run", "-j", "1", "-b", str(diffim_repo), "-i", f"{run},{DEFAULTS}", "-o", output,
        "-p", pipeline_uri("ApPipe.yaml#isr"),
        "-d", f"instrument='{INSTRUMENT}' AND exposure IN ({', '.join(map(str, exposures))})",
        "--register-dataset-types",
    ])
    written = {int(r.dataId["exposure"]) for r in
               Butler.from_config(str(diffim_repo)).query_datasets("postISRCCD", collections=output, explain=False)}
    return {"code": code, "log": log, "good": good, "truncated": truncated, "nan_amp": nan_amp, "wrong": wrong, "files": files,
                "written": written, "output": output, "repo": diffim_repo}


def _error_line(log: str, exposure: int) -> str:
    lines = [ln for ln in log.splitlines() if "ERROR" in ln and f"exposure: {exposure}," in ln and "failed." in ln]
    assert lines, f"no error line for exposure {exposure}"
    return lines[0]


def _common(run):
    assert run["code"] == 1
    assert "Executed 1 quanta successfully, 3 failed and 0 remain out of total 4 quanta" in run["log"]
    assert run["written"] == {run["good"]}, "a failed quantum left a postISRCCD"
    stray = glob.glob(f"{run['repo']}/{run['output']}/*/postISRCCD/**/*.fits", recursive=True)
    assert len(stray) == 1


def test_truncated_raw(bad_raw_run):
    _common(bad_raw_run)
    line = _error_line(bad_raw_run["log"], bad_raw_run["truncated"])
    assert bad_raw_run["files"]["truncated"] in line  # the file at fault


def test_raw_with_all_nan_amplifier(bad_raw_run):
    _common(bad_raw_run)
    line = _error_line(bad_raw_run["log"], bad_raw_run["nan_amp"])
    assert (f"BadInputError: ISR of raw {{instrument={INSTRUMENT}, detector={DETECTOR}, "
            f"exposure={bad_raw_run['nan_amp']}}} failed: Amplifier C10 of detector R22_S11 has no finite data "
            "pixels") in line


def test_raw_of_wrong_instrument(bad_raw_run):
    _common(bad_raw_run)
    line = _error_line(bad_raw_run["log"], bad_raw_run["wrong"])
    assert f"exposure={bad_raw_run['wrong']}}} failed: A raw of shape" in line
    assert "is not an LSSTCam-imSim detector" in line


def test_missing_calibrations(diffim_repo, science_visits):
    """-i without the calibration collection: pipetask refuses to build the graph, naming the calib."""
    output = unique("no_calib")
    code, log = pipetask_inprocess([
        "run", "-j", "1", "-b", str(diffim_repo), "-i", "2.2i/raw/all,skymaps,refcats", "-o", output,
        "-p", pipeline_uri("ApPipe.yaml#isr"), "-d", visits_where(science_visits[:1]).replace("visit", "exposure"),
    ])
    assert code != 0
    assert "Not enough datasets (0) found for non-optional connection isr." in log, log[-2000:]
    assert f"exposure: {science_visits[0]}," in log
    from lsst.daf.butler import Butler, MissingCollectionError

    with pytest.raises(MissingCollectionError):
        Butler.from_config(str(diffim_repo)).registry.getCollectionType(output)


def test_no_template_coverage(diffim_repo, science_visits, caplog):
    """requiredTemplateFraction above the coverage: NoWorkFound from retrieveTemplate,
    downstream quanta skipped, nothing written, the message says how to force it."""
    import logging

    from lsst.daf.butler import Butler

    output = unique("no_template")
    with caplog.at_level(logging.INFO):
        run_subset(diffim_repo, "ApPipe.yaml#retrieveTemplate,subtractImages", inputs=[DIFFIM_COLLECTION],
                   output=output, where=visits_where(science_visits[:1]),
                   config_overrides={"retrieveTemplate": {"requiredTemplateFraction": 0.9999}})
    assert any("below requiredTemplateFraction=" in r.getMessage() and "set it to 0 to force" in r.getMessage()
               for r in caplog.records)
    butler = Butler.from_config(str(diffim_repo))
    run = butler.registry.getCollectionChain(output)[0]  # the output RUN (the chain also holds the inputs)
    for name in ("goodSeeingDiff_templateExp", "goodSeeingDiff_differenceTempExp"):
        assert not butler.query_datasets(name, collections=run, explain=False)


def _run_dia_pipe(repo, visit, overrides):
    return run_subset(repo, "ApPipe.yaml#diaPipe", inputs=[DIFFIM_COLLECTION], output=unique("diapipe_bad"),
                      where=visits_where([visit]), config_overrides={"diaPipe": overrides})


def test_apdb_does_not_exist(diffim_repo, science_visits, tmp_path):
    db = tmp_path / "nowhere.db"
    with pytest.raises(Exception) as info:
        _run_dia_pipe(diffim_repo, science_visits[0], {"apdb.db_url": f"sqlite:///{db}",
                                                        "apdb.isolation_level": "READ_UNCOMMITTED"})
    text = str(info.value)
    assert f"diaPipe visit={science_visits[0]}, detector={DETECTOR}: no APDB at {db}" in text
    assert "make_apdb.py -c db_url=" in text
    assert not db.exists(), "opening a missing APDB created an empty database file"


def test_apdb_other_schema_version(diffim_repo, science_visits, tmp_path):
    from diapipe.apdb import create_apdb

    db = tmp_path / "old.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE metadata SET value = '0.1.0' WHERE name = 'version:schema'")
    with pytest.raises(Exception) as info:
        _run_dia_pipe(diffim_repo, science_visits[0], {"apdb.db_url": f"sqlite:///{db}",
                                                        "apdb.isolation_level": "READ_UNCOMMITTED"})
    text = str(info.value)
    assert "was made with another schema or dax_apdb version" in text and "0.1.0" in text
    with sqlite3.connect(db) as conn:
        assert conn.execute('SELECT count(*) FROM "DiaSource"').fetchone()[0] == 0


def test_config_file_missing(diffim_repo, science_visits, tmp_path):
    """``-C diaPipe:missing.py`` (pipetask names the file) and apdb_config_url to a missing YAML."""
    missing = tmp_path / "missing.py"
    code, log = pipetask_inprocess([
        "run", "-j", "1", "-b", str(diffim_repo), "-i", DIFFIM_COLLECTION, "-o", unique("missing_config"),
        "-p", pipeline_uri("ApPipe.yaml#diaPipe"), "-C", f"diaPipe:{missing}", "-d", visits_where(science_visits[:1]),
    ])
    assert code != 0 and str(missing) in log, log[-2000:]
    missing_yaml = tmp_path / "missing.apdb.yaml"
    with pytest.raises(Exception) as info:
        _run_dia_pipe(diffim_repo, science_visits[0], {"apdb_config_url": str(missing_yaml)})
    assert f"APDB config file {missing_yaml} does not exist" in str(info.value)


def test_where_unknown_dimension(diffim_repo):
    code, log = pipetask_inprocess([
        "qgraph", "-b", str(diffim_repo), "-i", DIFFIM_COLLECTION, "-o", unique("bad_where"),
        "-p", pipeline_uri("ApPipe.yaml#isr"), "-d", "nosuchdimension = 5",
    ])
    assert code != 0 and "nosuchdimension" in log, log[-2000:]


def test_read_only_repository(diffim_repo):
    """As root, chmod cannot make a repository read-only (root writes anyway); a butler
    opened with writeable=False (a read-only repository) must refuse to start an
    output run, saying so, and write nothing."""
    from lsst.daf.butler import Butler, MissingCollectionError

    output = unique("read_only")
    with pytest.raises(Exception) as info:
        Butler.from_config(str(diffim_repo), writeable=False, collections=[DIFFIM_COLLECTION], run=output)
    assert "database is read-only" in str(info.value), repr(info.value)
    with pytest.raises(MissingCollectionError):
        Butler.from_config(str(diffim_repo)).registry.getCollectionType(output)


def test_astrometry_cannot_converge(diffim_repo, science_visits):
    """An icExp whose pointing is 3' off (beyond calibrate.maxOffsetArcsec = 20"): its
    calibrate quantum fails naming the data ID and the reason; the other visit's calexp is
    made; no calexp is left for the failed one."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(diffim_repo), writeable=True)
    bad, good = science_visits[:2]
    exposure = butler.get("icExp", instrument=INSTRUMENT, visit=bad, detector=DETECTOR, collections=DIFFIM_COLLECTION)
    exposure.wcs.wcs.crval = exposure.wcs.wcs.crval + np.array([0.0, 3.0 / 60.0])
    run = unique("off_pointing")
    butler.registry.registerRun(run)
    butler.put(exposure, "icExp", instrument=INSTRUMENT, visit=bad, detector=DETECTOR, run=run)
    output = unique("no_astrometry")
    code, log = pipetask_inprocess([
        "run", "-j", "1", "-b", str(diffim_repo), "-i", f"{run},{DIFFIM_COLLECTION}", "-o", output,
        "-p", pipeline_uri("ApPipe.yaml#calibrate"), "-d", visits_where([bad, good]),
    ])
    assert code == 1
    assert "Executed 1 quanta successfully, 1 failed and 0 remain out of total 2 quanta" in log, log[-2000:]
    lines = [ln for ln in log.splitlines() if "ERROR" in ln and f"visit: {bad}," in ln and "failed." in ln]
    assert lines, log[-2000:]
    assert f"calibrate for {{instrument={INSTRUMENT}, detector={DETECTOR}, visit={bad}}}: astrometry did not converge" in log, log[-3000:]
    written = {int(r.dataId["visit"]) for r in Butler.from_config(str(diffim_repo)).query_datasets(
        "calexp", collections=butler.registry.getCollectionChain(output)[0], explain=False)}
    assert written == {good}


def test_too_few_good_seeing_visits(diffim_repo):
    """selectGoodSeeingVisits asked for more visits than the patch has: the quantum fails
    naming the patch and both numbers; nothing is written."""
    from lsst.daf.butler import Butler

    output = unique("few_visits")
    code, log = pipetask_inprocess([
        "run", "-j", "1", "-b", str(diffim_repo), "-i", TEMPLATE_COLLECTION, "-o", output,
        "-p", pipeline_uri("ApTemplate.yaml#selectGoodSeeingVisits"),
        "-d", "skymap='DC2' AND tract=3828 AND patch=24 AND band='g'",
        "-c", "selectGoodSeeingVisits:minRequiredVisits=50",
    ])
    assert code == 1
    assert "0 quanta successfully, 1 failed" in log, log[-2000:]
    assert ("selectGoodSeeingVisits for {band=g, instrument=LSSTCam-imSim, skymap=DC2, tract=3828, patch=24}: "
            "only 6 usable visits") in log, log[-3000:]
    assert "a template needs at least 50" in log
    chain = Butler.from_config(str(diffim_repo)).registry.getCollectionChain(output)
    assert not Butler.from_config(str(diffim_repo)).query_datasets("goodSeeingVisits", collections=chain[0],
                                                                   explain=False)
