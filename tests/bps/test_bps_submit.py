"""``bps submit`` (ctrl_bps + Parsl, local site, 2 cores) of the shipped configs.

- ApTemplate-DC2-bps.yaml on the ``test`` preset gives the same calexps and
  goodSeeingCoadd as the in-process run of ApTemplate.yaml (``template_repo``).
- ApPipe-DC2-bps.yaml into a PostgreSQL APDB gives the same DiaSources
  (visit, detector, position within 0.01") as an in-process run into an sqlite
  APDB, and no password shows up in logs, task metadata, configs or outputs.

Each submission costs a minute or more (one process per job); these are the
only two in the suite.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from testing_helpers import TEMPLATE_COLLECTION, TEMPLATE_WHERE

BPS_DIR = Path(__file__).resolve().parents[2] / "src" / "diapipe" / "ap_pipe" / "bps"
INPUT = "2.2i/defaults/test"


def bps_env(workdir: Path | None = None) -> dict[str, str]:
    """What ``eval "$(diapipe env)"`` exports, for the bps subprocess and its jobs.

    ``PWD`` follows ``workdir``: bps puts its submit folder at ``${PWD}/submit``.
    """
    from diapipe.pipelines import ap_pipe_dir

    env = dict(os.environ)
    prefix = sys.prefix
    env.update(
        AP_PIPE_DIR=ap_pipe_dir(),
        CTRL_MPEXEC_DIR=prefix,
        DAF_BUTLER_DIR=prefix,
        PATH=os.path.join(prefix, "bin") + os.pathsep + env.get("PATH", ""),
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
    )
    if workdir is not None:
        env["PWD"] = str(workdir)
    return env


def bps_submit(config: Path, workdir: Path, *args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    """Run ``bps submit`` in ``workdir`` (its submit/ folder lands there); fail with the log tail."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [os.path.join(sys.prefix, "bin", "bps"), "submit", *args, str(config)]
    result = subprocess.run(
        argv, cwd=workdir, env=bps_env(workdir), capture_output=True, text=True, timeout=timeout, check=False
    )
    (workdir / "bps-submit.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0 or "Run Name:" not in result.stdout + result.stderr:
        pytest.fail(f"{shlex.join(argv)} failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
    return result


def _failed_jobs(workdir: Path) -> dict[str, int]:
    """Parsl's end-of-run tally of jobs that failed (or never ran because a dependency failed)."""
    import re

    text = (workdir / "bps-submit.log").read_text()
    tally = dict(re.findall(r"Tasks in state States\.(\w+): (\d+)", text))
    assert "exec_done" in tally, "no Parsl task tally in the bps log"
    return {state: int(n) for state, n in tally.items() if state in ("failed", "dep_fail") and int(n)}


@pytest.mark.slow
def test_bps_aptemplate_matches_in_process_run(template_repo, tmp_path):
    from lsst.daf.butler import Butler

    output = "u/test/bps-templates"
    bps_submit(
        BPS_DIR / "ApTemplate-DC2-bps.yaml",
        tmp_path,
        "-b", str(template_repo), "-i", INPUT, "-o", output, "-d", f"instrument='LSSTCam-imSim' AND {TEMPLATE_WHERE}",
    )  # fmt: skip
    assert not _failed_jobs(tmp_path)
    butler = Butler.from_config(str(template_repo))
    for name in ("calexp", "goodSeeingCoadd"):
        ours = {ref.dataId: ref for ref in butler.query_datasets(name, collections=output, explain=False)}
        theirs = {ref.dataId: ref for ref in butler.query_datasets(name, collections=TEMPLATE_COLLECTION)}
        assert ours and set(ours) == set(theirs), name
        for data_id in sorted(ours, key=str):
            a, b = butler.get(ours[data_id]), butler.get(theirs[data_id])
            for plane in ("image", "mask", "variance"):
                assert np.array_equal(getattr(a, plane), getattr(b, plane), equal_nan=True), (name, data_id, plane)


def _science_visits(butler) -> list[int]:
    from diapipe.sim.presets import get_preset

    visits = sorted(rec.id for rec in butler.query_dimension_records("visit", instrument="LSSTCam-imSim"))
    return visits[-get_preset("test").n_science_visits :]


def _dia_sources(engine):
    import pandas as pd

    return pd.read_sql('SELECT "visit", "detector", "ra", "dec" FROM "DiaSource"', engine)


def _assert_same_sources(a, b, tol_arcsec=0.01):
    """Same DiaSources: equal counts per (visit, detector), each one matched within tol."""
    counts_a = a.groupby(["visit", "detector"]).size().to_dict()
    counts_b = b.groupby(["visit", "detector"]).size().to_dict()
    assert counts_a == counts_b
    for key, group in a.groupby(["visit", "detector"]):
        other = b[(b.visit == key[0]) & (b.detector == key[1])]
        cosd = np.cos(np.deg2rad(group.dec.to_numpy()))[:, None]
        dra = (group.ra.to_numpy()[:, None] - other.ra.to_numpy()[None, :]) * cosd
        ddec = group.dec.to_numpy()[:, None] - other.dec.to_numpy()[None, :]
        sep_arcsec = np.hypot(dra, ddec).min(axis=1) * 3600
        assert sep_arcsec.max() < tol_arcsec, (key, sep_arcsec.max())


def _grep_passwords(passwords, *roots):
    """Files under ``roots`` holding any password (binary-safe: sqlite, FITS, parquet too)."""
    hits = []
    needles = [pw.encode() for pw in passwords]
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                hits += [str(path) for needle in needles if needle in data]
    return hits


@pytest.mark.slow
def test_bps_appipe_into_postgres_matches_sqlite(template_repo, postgres_server, tmp_path):
    import sqlalchemy
    import yaml
    from lsst.daf.butler import Butler
    from lsst.utils.db_auth import DbAuth

    from diapipe.apdb import create_apdb
    from diapipe.pipelines import run_pipeline

    butler = Butler.from_config(str(template_repo))
    visits = _science_visits(butler)
    where = f"skymap='DC2' AND band='g' AND visit IN ({', '.join(map(str, visits))})"
    inputs = [TEMPLATE_COLLECTION, INPUT]

    # reference: in-process (pipetask's executor) into an sqlite APDB
    sqlite_url = f"sqlite:///{tmp_path / 'apdb.db'}"
    create_apdb(sqlite_url, isolation_level="READ_UNCOMMITTED")
    run_pipeline(
        template_repo,
        "ApPipe.yaml",
        inputs=inputs,
        output="u/test/appipe-sqlite",
        where=where,
        config_overrides={"diaPipe": {"apdb.db_url": sqlite_url, "apdb.isolation_level": "READ_UNCOMMITTED"}},
    )

    # bps into PostgreSQL: the user's copy of ApPipe-DC2-bps.yaml, APDB made by apdb-cli
    pg_url = postgres_server.create_database("apdb_bps")
    result = subprocess.run(
        [os.path.join(sys.prefix, "bin", "apdb-cli"), "create-sql", pg_url, str(tmp_path / "apdb-pg.yaml")],
        capture_output=True, text=True, env=bps_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    config = tmp_path / "My-ApPipe-DC2-bps.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "includeConfigs": [str(BPS_DIR / "ApPipe-DC2-bps.yaml")],
                "apdbUrl": postgres_server.url("apdb_bps", driver=None),
                "payload": {"butlerConfig": str(template_repo), "inCollection": ",".join(inputs),
                            "output": "u/test/appipe-bps", "dataQuery": where},
            }
        )
    )  # fmt: skip
    bps_submit(config, tmp_path / "bps")
    assert not _failed_jobs(tmp_path / "bps")

    sqlite_engine = sqlalchemy.create_engine(sqlite_url)
    pg_engine = sqlalchemy.create_engine(DbAuth().getUrl(pg_url))
    try:
        ref, ours = _dia_sources(sqlite_engine), _dia_sources(pg_engine)
    finally:
        sqlite_engine.dispose()
        pg_engine.dispose()
    assert len(ref) > 0
    assert set(ours.visit) == set(visits)
    _assert_same_sources(ours, ref)
    _assert_same_sources(ref, ours)

    # no password in submit logs, job logs, the repository (task metadata, configs,
    # provenance, registry) or the server's log
    passwords = [entry["password"] for entry in yaml.safe_load(postgres_server.auth_file.read_text())]
    assert _grep_passwords(passwords, tmp_path, template_repo, postgres_server.log_file) == []
