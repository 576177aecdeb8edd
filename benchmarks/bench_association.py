"""Benchmark: optimal association of 1e4 DiaSources against 1e3..1e6 DiaObjects.

Target: 1e4 sources x 1e6 objects in <= 1 s (the brief of issue 6). Also times
`dia_object_summary` on 1e5 DiaSource rows. Prints a table and a JSON line.

    .venv/bin/python benchmarks/bench_association.py [--repeat 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from diapipe.association.match import associate
from diapipe.association.summary import dia_object_summary

ARCSEC = 1.0 / 3600.0


def _scene(rng, n_obj, n_src, area_deg=4.0):
    """Objects at a fixed sky density (1e6 per 16 deg²) so confusion does not depend on n_obj."""
    side = area_deg * np.sqrt(n_obj / 1e6)
    obj = pd.DataFrame({"diaObjectId": np.arange(n_obj, dtype=np.int64),
                        "ra": rng.uniform(150, 150 + side, n_obj), "dec": rng.uniform(0, side, n_obj)})
    n_true = min(int(0.9 * n_src), n_obj)
    truth = rng.choice(n_obj, n_true, replace=False)
    ra = np.concatenate([obj.ra.values[truth], rng.uniform(150, 150 + side, n_src - n_true)])
    dec = np.concatenate([obj.dec.values[truth], rng.uniform(0, side, n_src - n_true)])
    src = pd.DataFrame({"ra": ra + rng.normal(0, 0.1, n_src) * ARCSEC, "dec": dec + rng.normal(0, 0.1, n_src) * ARCSEC,
                        "raErr": 0.1 * ARCSEC, "decErr": 0.1 * ARCSEC})
    return src, obj, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n-src", type=int, default=10_000)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    rows = []
    for n_obj in (1_000, 10_000, 100_000, 1_000_000):
        src, obj, truth = _scene(rng, n_obj, args.n_src)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            res = associate(src, obj)
            times.append(time.perf_counter() - t0)
        m = res.matches
        true_rows = m.source_row.to_numpy() < len(truth)
        correct = float(np.mean(m.object_row.to_numpy()[true_rows] == truth[m.source_row.to_numpy()[true_rows]]))
        rows.append({"n_objects": n_obj, "n_sources": args.n_src, "seconds_median": float(np.median(times)),
                     "seconds_min": float(np.min(times)), "n_candidates": res.n_candidates,
                     "n_matched": int(len(m)), "fraction_correct": correct})
    n_rows = 100_000
    src = pd.DataFrame({"diaObjectId": rng.integers(0, 20_000, n_rows), "ra": rng.uniform(0, 1, n_rows),
                        "dec": rng.uniform(0, 1, n_rows), "midpointMjdTai": rng.uniform(60000, 60300, n_rows),
                        "band": rng.choice(list("ugrizy"), n_rows), "psfFlux": rng.normal(0, 1, n_rows),
                        "psfFluxErr": np.ones(n_rows), "scienceFlux": rng.normal(0, 1, n_rows),
                        "scienceFluxErr": np.ones(n_rows)})
    t_sum = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        dia_object_summary(src)
        t_sum.append(time.perf_counter() - t0)

    print(f"{'n_objects':>10} {'n_sources':>9} {'median s':>9} {'min s':>7} {'cand':>7} {'matched':>8} {'correct':>8}")
    for r in rows:
        print(f"{r['n_objects']:>10} {r['n_sources']:>9} {r['seconds_median']:>9.3f} {r['seconds_min']:>7.3f} "
              f"{r['n_candidates']:>7} {r['n_matched']:>8} {r['fraction_correct']:>8.4f}")
    print(f"dia_object_summary: {n_rows} rows -> 20000 objects in {np.median(t_sum):.3f} s (median)")
    result = {"association": rows, "summary_1e5_rows_seconds": float(np.median(t_sum))}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(result, stream, indent=2)


if __name__ == "__main__":
    main()
