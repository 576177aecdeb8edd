"""Alerts are neither lost nor duplicated when diaPipe is SIGKILLed around the APDB store.

A worker process runs `DiaPipelineTask` on synthetic detector-visits (the
association_task suite's, one detector, three visits) into an sqlite APDB. For the
second detector-visit (which has history) its ``Apdb.store`` is wrapped to signal
the test and then wait, either right *after* the store committed or right *before*
it; the test SIGKILLs the worker at that moment (deterministic: no timing guess).
Then the rest is run the way a resume does (the killed detector-visit again, then
the others), and the published alert files are compared with an uninterrupted run:
the same files, each DiaSource in exactly one packet, packets equal field by field
(processing timestamps aside).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from diapipe.alerts import read_alerts, validate_packet
from diapipe.apdb import create_apdb
from diapipe.association.tasks import DiaPipelineConfig, DiaPipelineTask

HERE = Path(__file__).resolve().parent
SYNTHETIC = HERE.parent / "association_task"
N_VISITS = 3
KILLED = 1  #: index of the detector-visit whose store is interrupted

_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {synthetic!r})
    from _synthetic import detector_visits
    from diapipe.association.tasks import DiaPipelineConfig, DiaPipelineTask

    db, signal_file, when = Path({db!r}), Path({signal_file!r}), {when!r}
    config = DiaPipelineConfig()
    config.apdb.db_url = f"sqlite:///{{db}}"
    config.apdb.isolation_level = "READ_UNCOMMITTED"
    config.validate()
    task = DiaPipelineTask(config=config)
    _, dvs = detector_visits(n_visits={n_visits}, detectors=(0,))
    for k, (visit, det, mjd, table, diff, calexp, tmpl, _) in enumerate(dvs):
        if k == {killed}:
            apdb = task.get_apdb()
            real_store = apdb.store

            def store(*args, **kwargs):
                if when == "after":
                    real_store(*args, **kwargs)
                signal_file.write_text(when)
                time.sleep(600)  # SIGKILLed here

            apdb.store = store
        task.run(diaSourceTable=table, diffIm=diff, exposure=calexp, template=tmpl)
    print("not killed")
    """
)


def _task(db: Path) -> DiaPipelineTask:
    config = DiaPipelineConfig()
    config.apdb.db_url = f"sqlite:///{db}"
    config.apdb.isolation_level = "READ_UNCOMMITTED"
    config.validate()
    return DiaPipelineTask(config=config)


def _detector_visits():
    sys.path.insert(0, str(SYNTHETIC))
    from _synthetic import detector_visits

    return detector_visits(n_visits=N_VISITS, detectors=(0,))[1]


def _run(task, dvs):
    return [task.run(diaSourceTable=t, diffIm=d, exposure=c, template=m) for _, _, _, t, d, c, m, _ in dvs]


def _strip(value):
    """Packet without the processing timestamps (they record when, not what)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("timeProcessed")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _published(folder: Path) -> dict[str, list[dict]]:
    return {p.name: sorted(read_alerts(p), key=lambda a: a["diaSourceId"]) for p in sorted(folder.glob("*.avro"))}


@pytest.fixture(scope="module")
def dvs():
    return _detector_visits()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dvs):
    """Alerts of the uninterrupted run."""
    db = tmp_path_factory.mktemp("alerts_ref") / "ref.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    _run(_task(db), dvs)
    return _published(db.with_name("ref_alerts"))


def _kill_worker(tmp_path: Path, db: Path, when: str) -> float:
    """Run the worker until its KILLED-th store signals; SIGKILL it; return seconds to the kill."""
    signal_file = tmp_path / "at_store"
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(synthetic=str(SYNTHETIC), db=str(db), signal_file=str(signal_file),
                                     when=when, n_visits=N_VISITS, killed=KILLED))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]))
    t0 = time.monotonic()
    with open(tmp_path / "worker.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while not signal_file.exists():
                if proc.poll() is not None:
                    pytest.fail(f"worker exited ({proc.returncode}) before its store: "
                                f"{(tmp_path / 'worker.log').read_text()[-3000:]}")
                if time.monotonic() - t0 > 300:
                    pytest.fail("worker did not reach the store in 300 s")
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return time.monotonic() - t0


@pytest.mark.parametrize("when", ["after", "before"])
def test_kill_around_store_loses_and_duplicates_no_alert(tmp_path, dvs, reference, when, caplog):
    """``after``: killed after the store committed, before its alert file was published
    (the case that used to lose the detector-visit's alerts: the rerun skips it);
    ``before``: killed with the alerts written ahead but nothing stored (they must never
    be published as they are: the rerun recomputes and stores them)."""
    db = tmp_path / "killed.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    folder = db.with_name("killed_alerts")
    kill_s = _kill_worker(tmp_path, db, when)

    visit, detector = dvs[KILLED][0], dvs[KILLED][1]
    name = f"{visit}_{detector}.avro"
    # At the kill: the earlier detector-visits published, the killed one only pending.
    assert sorted(p.name for p in folder.glob("*.avro")) == [f"{v}_{d}.avro" for v, d, *_ in dvs[:KILLED]]
    assert (folder / (name + ".pending")).exists()

    # The resume: the killed detector-visit again, then the rest.
    task = _task(db)
    results = _run(task, dvs[KILLED:])
    marker = results[0].apdbMarker
    if when == "after":
        assert marker["alreadyInApdb"] is True and marker["alertsState"] == "published"
        assert "died before publishing its alerts; published its" in caplog.text
    else:
        assert marker["alreadyInApdb"] is False and marker["alertsState"] == "written"
    assert marker["numAlerts"] == len(dvs[KILLED][3])
    assert not list(folder.glob("*.pending")), "a pending alert file was left behind"

    got = _published(folder)
    assert got.keys() == reference.keys()
    n = 0
    for file, packets in reference.items():
        ids = [p["diaSourceId"] for p in got[file]]
        assert len(ids) == len(set(ids)), f"{file}: duplicated alerts"
        assert ids == [p["diaSourceId"] for p in packets], f"{file}: alerts lost or extra"
        for a, b in zip(got[file], packets):
            validate_packet(a)
            assert _strip(a) == _strip(b), f"{file}: packet {a['diaSourceId']} differs from the uninterrupted run"
            n += 1
    all_ids = [p["diaSourceId"] for packets in got.values() for p in packets]
    assert len(all_ids) == len(set(all_ids)) == n == sum(len(dv[3]) for dv in dvs)
    print(f"killed {when} the store after {kill_s:.1f} s; {n} alerts, none lost or duplicated")


def test_rerun_of_a_published_detector_visit_writes_nothing(tmp_path, dvs):
    """A plain rerun (nothing killed) leaves the published files untouched: no second copy."""
    db = tmp_path / "rerun.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    task = _task(db)
    _run(task, dvs[:1])
    path = db.with_name("rerun_alerts") / f"{dvs[0][0]}_{dvs[0][1]}.avro"
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    marker = _run(task, dvs[:1])[0].apdbMarker
    assert marker["alreadyInApdb"] is True and marker["alertsState"] == "present"
    assert marker["numAlerts"] == len(dvs[0][3])
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
