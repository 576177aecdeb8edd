"""Helpers of the reliability suite: pipetask in-process and as a killable
process group, APDB snapshots and their comparison."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "APDB_OPTIONS",
    "DEFAULTS",
    "DIFFIM_COLLECTION",
    "TEMPLATE_COLLECTION",
    "assert_apdb_consistent",
    "assert_same_apdb",
    "pipeline_uri",
    "pipetask_command",
    "pipetask_inprocess",
    "read_apdb",
    "registry_clone",
    "run_and_kill",
    "run_subset",
    "unique",
]

DIFFIM_COLLECTION = "u/test/diffim"
TEMPLATE_COLLECTION = "u/test/templates"
DEFAULTS = "2.2i/defaults/test"
INSTRUMENT = "LSSTCam-imSim"
DETECTOR = 94  #: the test preset's one detector


def unique(prefix: str) -> str:
    """A new collection name (tests never reuse or modify another's collections)."""
    return f"u/reliability/{prefix}_{uuid.uuid4().hex[:8]}"


def registry_clone(repo: Path, dest: Path) -> Path:
    """A repository at ``dest`` with its own copy of ``repo``'s SQLite registry and
    ``repo``'s file datastore (new files go under ``repo``, in new RUN folders).

    For tests that SIGKILL pipetask: a kill inside a registry transaction leaves a hot
    journal, and until a writeable connection rolls it back every read-only butler on
    that registry fails with "attempt to write a readonly database". On a clone, the
    shared session repository never sees the kill.
    """
    import yaml

    dest.mkdir(parents=True)
    source = sqlite3.connect(str(Path(repo) / "gen3.sqlite3"))  # writeable: rolls back a hot journal
    target = sqlite3.connect(str(dest / "gen3.sqlite3"))
    try:
        source.backup(target)  # a consistent snapshot even while other workers write
    finally:
        source.close()
        target.close()
    config = yaml.safe_load((Path(repo) / "butler.yaml").read_text())
    config["datastore"]["root"] = str(Path(repo).resolve())
    (dest / "butler.yaml").write_text(yaml.safe_dump(config))
    return dest


def ap_pipe_dir() -> str:
    from diapipe.pipelines import ap_pipe_dir as _dir

    os.environ.setdefault("AP_PIPE_DIR", _dir())
    return os.environ["AP_PIPE_DIR"]


def pipeline_uri(spec: str) -> str:
    """``ApPipe.yaml#a,b`` → the ``$AP_PIPE_DIR`` file with the same label selection."""
    ap_pipe_dir()
    name, _, labels = spec.partition("#")
    path = f"$AP_PIPE_DIR/pipelines/LsstCamImSim/{name}"
    return f"{path}#{labels}" if labels else path


def apdb_options(db: Path, label: str = "diaPipe") -> dict:
    return {"apdb.db_url": f"sqlite:///{db}", "apdb.isolation_level": "READ_UNCOMMITTED"}


APDB_OPTIONS = apdb_options


def run_subset(repo, spec: str, *, inputs, output: str, where: str, config_overrides=None, butler=None):
    """Run pipeline ``spec`` (``name.yaml#labels``) in this process (SimplePipelineExecutor)."""
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    uri = os.path.expandvars(pipeline_uri(spec))
    if butler is None:
        butler = SimplePipelineExecutor.prep_butler(str(repo), inputs=list(inputs), output=output)
    pipe = Pipeline.from_uri(uri)
    for label, fields in (config_overrides or {}).items():
        for field, value in fields.items():
            pipe.addConfigOverride(label, field, value)
    executor = SimplePipelineExecutor.from_pipeline(pipe, where=where, butler=butler)
    return executor.run(register_dataset_types=True)


def pipetask_inprocess(args: list[str]):
    """``pipetask ARGS`` in this process (no start-up cost); returns (exit code, log + output)."""
    from lsst.ctrl.mpexec.cli.pipetask import cli
    from lsst.daf.butler.cli.utils import LogCliRunner

    ap_pipe_dir()
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name} {record.levelname}: {record.getMessage()}")

    handler = Collect(level=logging.DEBUG)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        result = LogCliRunner().invoke(cli, args)
    finally:
        root.removeHandler(handler)
    output = "\n".join(records) + "\n" + result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += f"\n{type(result.exception).__name__}: {result.exception}"
    return result.exit_code, output


def pipetask_command(args: list[str]) -> list[str]:
    """The ``pipetask`` command line of this venv."""
    return [str(Path(sys.executable).with_name("pipetask")), *args]


def run_and_kill(args: list[str], log: Path, trigger, *, timeout_s: float = 300.0, poll_s: float = 0.05):
    """Start ``pipetask ARGS`` in its own process group; SIGKILL the whole group
    (pipetask and its -j workers, like a node crash) as soon as ``trigger()`` is
    true. Returns True if killed, False if the run finished first (exit code 0); a run
    that fails before the kill point raises, with the end of its log."""
    ap_pipe_dir()
    with open(log, "w") as stream:
        proc = subprocess.Popen(
            pipetask_command(args), stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
        start = time.monotonic()
        try:
            while proc.poll() is None:
                if trigger():
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return True
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"pipetask {' '.join(args)} did not reach the kill point in {timeout_s} s")
                time.sleep(poll_s)
            if proc.returncode != 0:
                raise AssertionError(f"pipetask failed (exit {proc.returncode}) before the kill point: "
                                     f"{log.read_text(errors='replace')[-3000:]}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return False


def run_pipetask(args: list[str], log: Path, timeout_s: float = 600.0) -> int:
    """``pipetask ARGS`` as a process (for -j 2); output to ``log``; returns the exit code."""
    ap_pipe_dir()
    with open(log, "w") as stream:
        return subprocess.run(pipetask_command(args), stdout=stream, stderr=subprocess.STDOUT, timeout=timeout_s, check=False).returncode


# -- APDB snapshots ------------------------------------------------------------------

#: key and value columns compared between two APDBs
OBJECT_COLUMNS = ["diaObjectId", "ra", "dec", "nDiaSources", "g_psfFluxMean", "g_psfFluxMeanErr", "g_psfFluxNdata",
                  "g_scienceFluxMean", "g_fpFluxMean"]
SOURCE_COLUMNS = ["diaSourceId", "diaObjectId", "visit", "detector", "ra", "dec", "psfFlux", "psfFluxErr",
                  "scienceFlux", "x", "y"]
FORCED_COLUMNS = ["diaForcedSourceId", "diaObjectId", "visit", "detector", "psfFlux", "psfFluxErr", "scienceFlux"]


def sqlite_count(db: Path, table: str, where: str = "") -> int:
    """Rows of ``table`` (read-only connection; 0 if the table is not there yet)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as conn:
            return int(conn.execute(f'SELECT count(*) FROM "{table}" {where}').fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def read_apdb(db: Path) -> dict[str, pd.DataFrame]:
    """Current DiaObjects, every DiaObject version, DiaSources and DiaForcedSources, sorted by key."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        objects = pd.read_sql_query('SELECT * FROM "DiaObject"', conn)
        sources = pd.read_sql_query('SELECT * FROM "DiaSource"', conn)
        forced = pd.read_sql_query('SELECT * FROM "DiaForcedSource"', conn)
    current = objects[objects["validityEndMjdTai"].isna()]
    return {
        "DiaObject": current[[c for c in OBJECT_COLUMNS if c in current]].sort_values("diaObjectId").reset_index(drop=True),
        "DiaObjectVersions": objects[["diaObjectId", "nDiaSources"]].sort_values(["diaObjectId", "nDiaSources"]).reset_index(drop=True),
        "DiaSource": sources[SOURCE_COLUMNS].sort_values("diaSourceId").reset_index(drop=True),
        "DiaForcedSource": forced[FORCED_COLUMNS].sort_values("diaForcedSourceId").reset_index(drop=True),
    }


def visit_order(db: Path) -> list[int]:
    """Visits in the order diaPipe stored them (sqlite rowids grow with insertion)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute('SELECT visit, min(rowid) r FROM "DiaSource" GROUP BY visit ORDER BY r').fetchall()
    return [int(v) for v, _ in rows]


def assert_same_apdb(got: dict, want: dict) -> None:
    """Same rows, same keys, same values (floats to 1e-9 relative; NaN equals NaN)."""
    for table, b in want.items():
        a = got[table]
        assert len(a) == len(b), f"{table}: {len(a)} rows, expected {len(b)}"
        for column in b.columns:
            x, y = a[column].to_numpy(), b[column].to_numpy()
            if np.issubdtype(y.dtype, np.floating) or np.issubdtype(x.dtype, np.floating):
                ok = np.isclose(x.astype(float), y.astype(float), rtol=1e-9, atol=0.0, equal_nan=True)
            else:
                ok = x == y
            assert ok.all(), f"{table}.{column} differs in {int((~ok).sum())} rows, e.g. {x[~ok][:3]} vs {y[~ok][:3]}"


def assert_apdb_consistent(snapshot: dict, expected_source_ids) -> None:
    """Nothing lost, nothing duplicated: the DiaSources are exactly ``expected_source_ids``,
    one current row per DiaObject, every DiaSource's object current, counts adding up."""
    sources, objects = snapshot["DiaSource"], snapshot["DiaObject"]
    expected = np.sort(np.asarray(list(expected_source_ids), dtype=np.int64))
    assert sources["diaSourceId"].is_unique, "duplicate DiaSources"
    got = np.sort(sources["diaSourceId"].to_numpy(dtype=np.int64))
    missing = np.setdiff1d(expected, got)
    extra = np.setdiff1d(got, expected)
    assert len(missing) == 0 and len(extra) == 0, f"{len(missing)} DiaSources lost, {len(extra)} unexpected"
    assert objects["diaObjectId"].is_unique, "two current versions of one DiaObject"
    assert set(sources["diaObjectId"]) == set(objects["diaObjectId"])
    assert int(objects["nDiaSources"].sum()) == len(sources)
    forced = snapshot["DiaForcedSource"]
    assert forced["diaForcedSourceId"].is_unique, "duplicate DiaForcedSources"
    assert not forced.duplicated(["diaObjectId", "visit", "detector"]).any()


def expected_dia_source_ids(repo, visits, collection: str = DIFFIM_COLLECTION) -> np.ndarray:
    """Every diaSourceId of the ``goodSeeingDiff_diaSrcTable`` of ``visits``."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(repo))
    ids = []
    for visit in visits:
        table = butler.get("goodSeeingDiff_diaSrcTable", instrument=INSTRUMENT, visit=int(visit), detector=DETECTOR,
                           collections=collection)
        ids.append(table["diaSourceId"].to_numpy(dtype=np.int64))
    return np.concatenate(ids)


def visits_where(visits) -> str:
    return f"instrument='{INSTRUMENT}' AND visit IN ({', '.join(str(int(v)) for v in visits)})"
