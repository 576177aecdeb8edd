"""ApPipe.yaml with diaPipe on the simulated test preset into a fresh sqlite
APDB (the guide's route): association purity and completeness against truth."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest

from testing_helpers import TEMPLATE_COLLECTION
from diapipe.apdb import create_apdb

pytestmark = pytest.mark.slow


def _truth_ids(butler, src: pd.DataFrame, radius_arcsec=0.5) -> pd.Series:
    """Truth object id of each DiaSource (nearest varying truth object within 0.5"), -1 if none."""
    from diapipe.association.match import unit_vectors
    from scipy.spatial import cKDTree

    out = pd.Series(-1, index=src.index, dtype=np.int64)
    for (visit, detector), rows in src.groupby(["visit", "detector"]):
        truth = butler.get("truth_source", instrument="LSSTCam-imSim", visit=int(visit), detector=int(detector),
                           collections="2.2i/truth")
        truth = truth[truth["drawn"] & (truth["diff_flux_njy"].abs() > 0)]
        if not len(truth):
            continue
        tree = cKDTree(unit_vectors(truth["ra"], truth["dec"]))
        d, i = tree.query(unit_vectors(rows["ra"], rows["dec"]))
        ok = d < np.deg2rad(radius_arcsec / 3600)
        out.loc[rows.index[ok]] = truth["id"].to_numpy()[i[ok]]
    return out


def test_ap_pipe_into_sqlite_apdb(template_repo, tmp_path):
    from lsst.daf.butler import Butler

    from diapipe.pipelines import run_pipeline

    db = tmp_path / "run1.db"
    create_apdb(f"sqlite:///{db}", isolation_level="READ_UNCOMMITTED")
    run_pipeline(
        template_repo,
        "ApPipe.yaml",
        inputs=[TEMPLATE_COLLECTION, "2.2i/defaults/test"],
        output="u/test/appipe_apdb",
        where="skymap='DC2' AND band='g'",
        config_overrides={"diaPipe": {"apdb.db_url": f"sqlite:///{db}", "apdb.isolation_level": "READ_UNCOMMITTED"}},
    )
    with sqlite3.connect(db) as conn:
        src = pd.read_sql_query('select * from "DiaSource"', conn)
        objs = pd.read_sql_query(
            'select "diaObjectId", "ra", "dec", "nDiaSources", "g_psfFluxMean", "validityEndMjdTai" '
            'from "DiaObject" where "validityEndMjdTai" is NULL', conn)
    assert len(src) > 0 and src["diaSourceId"].is_unique
    assert objs["diaObjectId"].is_unique and set(objs["diaObjectId"]) == set(src["diaObjectId"])
    butler = Butler(str(template_repo))
    src["truth"] = _truth_ids(butler, src)
    real = src[src["truth"] >= 0]
    per_obj = real.groupby("diaObjectId")["truth"].nunique()
    purity = float((per_obj == 1).mean())
    counts = real.groupby("truth").size()
    multi = real[real["truth"].isin(counts.index[counts >= 2])]
    completeness = float((multi.groupby("truth")["diaObjectId"].nunique() == 1).mean())
    print(f"purity {purity:.4f} over {len(per_obj)} objects; completeness {completeness:.4f} over "
          f"{multi['truth'].nunique()} truth objects seen >= 2 times; {len(src)} DiaSources, {len(real)} matched")
    assert multi["truth"].nunique() >= 5
    assert purity >= 0.99
    assert completeness >= 0.98
