"""Export the chain's own science/template pair (and our difference image and truth) to an .npz
that the peers' venv can read without diapipe or the butler.

    .venv/bin/python benchmarks/peers/export_pair.py REPO OUTDIR --visit V --detector D

Uses the newest ``bench/chain/*`` run (run_all.py's chain section) for the warped template
(goodSeeingDiff_templateExp) and our difference image; science = calexp (electrons, converted
to nJy with its PhotoCalib so both images share units).
"""

import argparse
import json
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("repo")
    p.add_argument("out")
    p.add_argument("--visit", type=int, required=True)
    p.add_argument("--detector", type=int, required=True)
    a = p.parse_args()
    from lsst.daf.butler import Butler

    butler = Butler(a.repo)
    chains = sorted(c for c in butler.registry.queryCollections("bench/chain/*")
                    if c.count("/") == 3)  # bench/chain/<stamp>/<repeat>
    if not chains:
        raise SystemExit("no bench/chain/* collection: run `run_all.py --only chain` first")
    coll = chains[-1]
    did = dict(instrument="LSSTCam-imSim", visit=a.visit, detector=a.detector)
    sci = butler.get("calexp", did, collections=coll)
    tmpl = butler.get("goodSeeingDiff_templateExp", did, collections=coll)
    diff = butler.get("goodSeeingDiff_differenceExp", did, collections=coll)
    truth = butler.get("truth_source", did, collections="2.2i/truth")
    cal = sci.photo_calib.calibration_mean
    h = sci.psf.compute_kernel_image(sci.shape[1] / 2, sci.shape[0] / 2)
    ht = tmpl.psf.compute_kernel_image(sci.shape[1] / 2, sci.shape[0] / 2)
    t = truth[truth["drawn"] & truth["on_detector"]]
    var = t[t["diff_flux_njy"].abs() > 0]
    from diapipe.exposure.masks import bits

    badbits = bits(["NO_DATA", "SAT", "BAD", "EDGE", "SUSPECT"])
    bad = ((sci.mask & badbits) != 0) | ((tmpl.mask & badbits) != 0) | ~np.isfinite(tmpl.image)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "pair.npz", sci=(sci.image * cal).astype(np.float32), sci_var=(sci.variance * cal**2).astype(np.float32),
             sci_mask=sci.mask, tmpl=tmpl.image.astype(np.float32), tmpl_var=tmpl.variance.astype(np.float32),
             tmpl_mask=tmpl.mask, bad=bad, diff=diff.image.astype(np.float32), diff_var=diff.variance.astype(np.float32),
             sci_psf=h.astype(np.float32), tmpl_psf=ht.astype(np.float32),
             truth_x=var["x"].to_numpy(float) - sci.xy0[0], truth_y=var["y"].to_numpy(float) - sci.xy0[1],
             truth_diff_njy=var["diff_flux_njy"].to_numpy(float),
             all_x=t["x"].to_numpy(float) - sci.xy0[0], all_y=t["y"].to_numpy(float) - sci.xy0[1])
    (out / "pair.json").write_text(json.dumps({"collection": coll, "visit": a.visit, "detector": a.detector,
                                               "shape": list(sci.shape), "calib_njy_per_e": cal,
                                               "n_truth_variable": int(len(var))}))
    print(f"exported {sci.shape} pair from {coll} to {out}")


if __name__ == "__main__":
    main()
