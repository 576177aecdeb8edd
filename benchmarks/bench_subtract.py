"""Time Alard–Lupton subtraction (spatially varying kernel + decorrelation) on a simulated pair.

Usage: python benchmarks/bench_subtract.py [--size 4096] [--out results.json]
Prints a table of stage timings and writes them as JSON. Goal: <= 4 s at 4096² on one core.
Run with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 for single-core numbers.
"""

import argparse
import json
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
    parser.add_argument("--out", default="bench_subtract.json")
    args = parser.parse_args()
    pair = make_pair(args.size, args.stars)
    rows = []
    for exact in (True, False):
        t0 = time.perf_counter()
        result = subtract_images(*pair, mode="auto", exact_variance=exact)
        total = time.perf_counter() - t0
        m = result.metadata
        rows.append({"size": args.size, "exact_variance": exact, "total_s": total, "fit_s": m["time_fit_s"],
                     "n_stamps_used": m["n_stamps_used"], "scale_factor": m["scale_factor"]})
    print(f"{'size':>6} {'exact var':>9} {'fit s':>7} {'total s':>8} {'stamps':>7} {'scale':>8}")
    for r in rows:
        print(f"{r['size']:>6} {r['exact_variance']!s:>9} {r['fit_s']:>7.2f} {r['total_s']:>8.2f} "
              f"{r['n_stamps_used']:>7} {r['scale_factor']:>8.4f}")
    with open(args.out, "w") as fh:
        json.dump({"date": time.strftime("%Y-%m-%d"), "results": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
