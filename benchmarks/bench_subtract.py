"""Time Alard–Lupton subtraction (spatially varying kernel + decorrelation) on a simulated pair.

Usage: python benchmarks/bench_subtract.py [--size 4096] [--repeat 3] [--out results.json]
Prints a table of timings (median of ``--repeat`` runs, with the 1-minute load average
before each run: the machine is shared) and writes them as JSON. Goal: <= 4 s at 4096²
on one core. Run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 for single-core numbers.
The default configuration (centre-kernel variance) is timed; ``--exact`` adds the exact
spatially varying variance propagation and reports its largest relative difference.
"""

import argparse
import json
import os
import time

import numpy as np
from astropy.table import Table

from diapipe.diffim.subtract import subtract_images
from diapipe.exposure.psf import PixelPsf


def make_pair(size, n_stars, seed=0, sigma_t=1.6, sigma_s=2.2, scale=1.03):
    rng = np.random.default_rng(seed)
    xs, ys = rng.uniform(30, size - 30, n_stars), rng.uniform(30, size - 30, n_stars)
    flux = 10 ** rng.uniform(2.8, 4.6, n_stars)
    half = 12
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    template = np.zeros((size, size))
    science = np.zeros((size, size))
    for x, y, f in zip(xs, ys, flux):
        xi, yi = int(x), int(y)
        dx, dy = xx - (x - xi), yy - (y - yi)
        r2 = dx**2 + dy**2
        template[yi - half : yi + half + 1, xi - half : xi + half + 1] += f * np.exp(-0.5 * r2 / sigma_t**2) / (2 * np.pi * sigma_t**2)
        science[yi - half : yi + half + 1, xi - half : xi + half + 1] += scale * f * np.exp(-0.5 * r2 / sigma_s**2) / (2 * np.pi * sigma_s**2)
    t_var = np.full((size, size), 25.0)
    s_var = np.full((size, size), 100.0)
    template += rng.normal(size=template.shape) * 5.0
    science += rng.normal(size=science.shape) * 10.0
    err = np.sqrt(4 * np.pi * sigma_s**2 * 100.0 + scale * flux)
    sources = Table({"x": xs, "y": ys, "psfFlux": scale * flux, "psfFluxErr": err, "flags": np.zeros(n_stars, bool)})
    bbox = (0, 0, size - 1, size - 1)
    zero = np.zeros((size, size), np.int32)
    return (science, s_var, zero, PixelPsf.gaussian(sigma_s, 25, bbox), template, t_var, zero.copy(),
            PixelPsf.gaussian(sigma_t, 25, bbox), sources)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--stars", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--exact", action="store_true", help="also time exact_variance=True")
    parser.add_argument("--out", default="bench_subtract.json")
    args = parser.parse_args()
    pair = make_pair(args.size, args.stars)
    rows = []
    results = {}
    for exact in ((False, True) if args.exact else (False,)):
        runs = []
        for _ in range(args.repeat):
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            result = subtract_images(*pair, mode="auto", exact_variance=exact)
            total = time.perf_counter() - t0
            runs.append((total, result.metadata["time_fit_s"], load))
        results[exact] = result
        m = result.metadata
        totals = [r[0] for r in runs]
        rows.append({"size": args.size, "exact_variance": exact, "total_s": float(np.median(totals)),
                     "total_runs_s": totals, "fit_s": float(np.median([r[1] for r in runs])),
                     "load_avg_1min": [r[2] for r in runs], "n_stamps_used": m["n_stamps_used"],
                     "scale_factor": m["scale_factor"]})
        del result
    print(f"{'size':>6} {'exact var':>9} {'fit s':>7} {'total s':>8} {'runs s':>22} {'load':>14} {'stamps':>7} {'scale':>8}")
    for r in rows:
        runs = ",".join(f"{t:.1f}" for t in r["total_runs_s"])
        loads = ",".join(f"{x:.1f}" for x in r["load_avg_1min"])
        print(f"{r['size']:>6} {r['exact_variance']!s:>9} {r['fit_s']:>7.2f} {r['total_s']:>8.2f} {runs:>22} "
              f"{loads:>14} {r['n_stamps_used']:>7} {r['scale_factor']:>8.4f}")
    if args.exact:
        a, b = results[False].matched_variance, results[True].matched_variance
        ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
        rel = np.abs(a[ok] / b[ok] - 1.0)
        print(f"centre-kernel vs exact matched variance: median |rel diff| {np.median(rel):.2e}, "
              f"99.9% {np.percentile(rel, 99.9):.2e}, max {rel.max():.2e}")
        rows.append({"variance_rel_diff_median": float(np.median(rel)),
                     "variance_rel_diff_p999": float(np.percentile(rel, 99.9)),
                     "variance_rel_diff_max": float(rel.max())})
    with open(args.out, "w") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
