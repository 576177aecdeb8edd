"""APDB store/load time as the tables grow (sqlite; PostgreSQL when a local server can be started).

Each step stores one synthetic detector-visit (``--per-visit`` new DiaObjects and DiaSources, plus
updates of ~30% previously stored objects in the same region, as association does) with
``apdb.store``, then times the loads diaPipe makes for the next visit of that region:
``getDiaObjects(region)`` and ``getDiaSources(region, objectIds, time)``.

    .venv/bin/python benchmarks/bench_apdb.py [--steps 10] [--per-visit 2000] [--postgres] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pandas as pd

BANDS = "ugrizy"


def _region(ra, dec, half_deg):
    import lsst.sphgeom as sg

    corners = [sg.UnitVector3d(sg.LonLat.fromDegrees(ra + dx, dec + dy)) for dx, dy in
               ((-half_deg, -half_deg), (half_deg, -half_deg), (half_deg, half_deg), (-half_deg, half_deg))]
    return sg.ConvexPolygon(corners)


def _objects(ids, ra, dec, nsrc):
    df = pd.DataFrame({"diaObjectId": ids, "ra": ra, "dec": dec, "nDiaSources": nsrc})
    for b in BANDS:
        df[f"{b}_psfFluxNdata"] = 0
    df["g_psfFluxNdata"] = nsrc
    df["g_psfFluxMean"] = 1000.0
    return df


def _sources(ids, obj_ids, ra, dec, visit, mjd):
    n = len(ids)
    return pd.DataFrame({"diaSourceId": ids, "diaObjectId": obj_ids, "visit": visit, "detector": 94,
                         "midpointMjdTai": mjd, "ra": ra, "dec": dec, "x": np.zeros(n), "y": np.zeros(n),
                         "psfNdata": 0, "dipoleNdata": 0, "trailNdata": 0, "timeProcessedMjdTai": mjd,
                         "bboxSize": 10, "band": "g", "psfFlux": 1000.0, "psfFluxErr": 10.0})


def run(db_url: str, steps: int, per_visit: int, label: str, seed: int = 3) -> list[dict]:
    from astropy.time import Time

    from diapipe.apdb import create_apdb, open_apdb

    cfg = create_apdb(db_url, isolation_level="READ_UNCOMMITTED" if db_url.startswith("sqlite") else None,
                      config_path=os.path.join(tempfile.mkdtemp(prefix="bench_apdb_cfg"), "apdb.yaml"))
    apdb = open_apdb(config_url=str(cfg.config_path)) if hasattr(cfg, "config_path") else open_apdb(db_url=db_url)
    rng = np.random.default_rng(seed)
    ra0, dec0, half = 60.0, -30.0, 0.12  # one detector's footprint (~0.25 deg across)
    region = _region(ra0, dec0, half + 0.01)
    next_obj, next_src, rows = 1, 1, []
    known = pd.DataFrame(columns=["diaObjectId", "ra", "dec", "nDiaSources"])
    for step in range(steps):
        mjd = 60250.0 + step
        t = Time(mjd, format="mjd", scale="tai")
        t0 = time.perf_counter()
        loaded = apdb.getDiaObjects(region)
        t_obj = time.perf_counter() - t0
        t0 = time.perf_counter()
        hist = apdb.getDiaSources(region, loaded["diaObjectId"].tolist() if len(loaded) else [], t)
        t_src = time.perf_counter() - t0
        n_upd = min(len(known), int(0.3 * per_visit))
        upd = known.sample(n_upd, random_state=step) if n_upd else known.iloc[:0]
        new_ids = np.arange(next_obj, next_obj + per_visit, dtype=np.int64)
        next_obj += per_visit
        ra = ra0 + rng.uniform(-half, half, per_visit)
        dec = dec0 + rng.uniform(-half, half, per_visit)
        objs = pd.concat([_objects(new_ids, ra, dec, 1),
                          _objects(upd["diaObjectId"].to_numpy(np.int64), upd["ra"].to_numpy(float),
                                   upd["dec"].to_numpy(float), upd["nDiaSources"].to_numpy(int) + 1)],
                         ignore_index=True)
        src_ids = np.arange(next_src, next_src + len(objs), dtype=np.int64)
        next_src += len(objs)
        srcs = _sources(src_ids, objs["diaObjectId"].to_numpy(), objs["ra"].to_numpy(), objs["dec"].to_numpy(),
                        1000 + step, mjd)
        t0 = time.perf_counter()
        apdb.store(t, objs, srcs, None)
        t_store = time.perf_counter() - t0
        known = pd.concat([known[~known["diaObjectId"].isin(objs["diaObjectId"])],
                           objs[["diaObjectId", "ra", "dec", "nDiaSources"]]], ignore_index=True)
        rows.append({"backend": label, "step": step, "n_objects_before": int(len(loaded)),
                     "n_sources_loaded": int(len(hist)), "n_stored_objects": int(len(objs)),
                     "load_objects_s": t_obj, "load_sources_s": t_src, "store_s": t_store})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--per-visit", type=int, default=2000)
    p.add_argument("--postgres", action="store_true", help="also a private PostgreSQL server (diapipe.apdb.postgres_server)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_apdb")
    rows = run(f"sqlite:///{work}/apdb.db", a.steps, a.per_visit, "sqlite")
    notes = []
    if a.postgres:
        try:
            from diapipe.apdb.postgres_server import start_server

            server = start_server(os.path.join(work, "pg"))
            try:
                server.create_database("apdb_bench", exist_ok=True)
                rows += run(server.url("apdb_bench"), a.steps, a.per_visit, "postgresql")
            finally:
                server.stop(remove=True)
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            notes.append(f"PostgreSQL not measured: {type(err).__name__}: {err}")
    print(f"{'backend':>10} {'step':>4} {'objs in region':>14} {'srcs loaded':>11} {'load obj s':>10} "
          f"{'load src s':>10} {'store s':>8}")
    for r in rows:
        print(f"{r['backend']:>10} {r['step']:>4} {r['n_objects_before']:>14} {r['n_sources_loaded']:>11} "
              f"{r['load_objects_s']:>10.3f} {r['load_sources_s']:>10.3f} {r['store_s']:>8.3f}")
    for n in notes:
        print(n)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "notes": notes}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
