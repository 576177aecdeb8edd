"""Run one difference-imaging method on an exported pair and score it against truth.

    PYTHON benchmarks/peers/run_peers.py PAIR_DIR --method {diapipe,sfft,zogy}

``diapipe``: our chain's difference image (from export_pair.py; its time is the chain's
subtractImages time, reported by run_all.py). ``sfft`` / ``zogy``: run here (peers venv).
Every method's difference image is scored by the SAME detector (sep, 5 sigma of a robust
background rms, minarea 5, bad pixels masked): completeness of truth variables/transients whose
expected difference S/N >= 10, and the number of detections > 2 px from any truth variable
("spurious": residuals of static sources and artefacts). Prints ``RESULT:{json}``.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def score(diff, bad, pair, method, seconds, extra=None):
    import sep

    d = np.ascontiguousarray(np.where(bad | ~np.isfinite(diff), 0.0, diff), dtype=np.float32)
    bkg = sep.Background(d, mask=bad, bw=128, bh=128)
    d = d - bkg.back()
    rms = float(np.median(bkg.rms()))
    sep.set_extract_pixstack(5_000_000)
    sep.set_sub_object_limit(4096)
    found = []
    for sign in (1.0, -1.0):
        objs = sep.extract(sign * d, 5.0, err=rms, mask=bad, minarea=5, deblend_cont=1.0)
        found.append(np.c_[objs["x"], objs["y"]])
    det = np.vstack(found)
    tx, ty, tf = pair["truth_x"], pair["truth_y"], pair["truth_diff_njy"]
    psf = pair["sci_psf"].astype(float)
    neff = 1.0 / float(np.sum((psf / psf.sum()) ** 2))
    # truth selection independent of the method: the expected noise of a difference of the pair
    noise = float(np.sqrt(np.median((pair["sci_var"] + pair["tmpl_var"])[~bad])))
    snr = np.abs(tf) / (noise * np.sqrt(neff))
    inside = (tx > 10) & (ty > 10) & (tx < d.shape[1] - 10) & (ty < d.shape[0] - 10)
    sel = inside & (snr >= 10)
    from scipy.spatial import cKDTree

    if len(det):
        dd, _ = cKDTree(det).query(np.c_[tx[sel], ty[sel]])
        completeness = float(np.mean(dd < 2.0)) if sel.any() else float("nan")
        dt, _ = cKDTree(np.c_[tx, ty]).query(det) if len(tx) else (np.full(len(det), np.inf), None)
        spurious = int(np.sum(dt > 2.0))
    else:
        completeness, spurious = 0.0, 0
    out = {"method": method, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "completeness": completeness, "n_truth": int(sel.sum()), "n_detections": int(len(det)),
           "n_spurious": spurious, "rms_diff": rms, "shape": list(d.shape)}
    out.update(extra or {})
    print("RESULT:" + json.dumps(out), flush=True)


def run_sfft(pair, work):
    from astropy.io import fits
    from sfft.EasySparsePacket import Easy_SparsePacket

    ref, sci = work / "ref.fits", work / "sci.fits"
    for path, key in ((ref, "tmpl"), (sci, "sci")):
        img = np.where(pair["bad"], np.nan, pair[key]).astype(np.float32)
        img = np.nan_to_num(img, nan=0.0)
        hdr = fits.Header({"GAIN": 1.0, "SATURATE": 1e9})
        fits.PrimaryHDU(img, header=hdr).writeto(path, overwrite=True)
    diff = work / "diff.fits"
    t0 = time.perf_counter()
    Easy_SparsePacket.ESP(FITS_REF=str(ref), FITS_SCI=str(sci), FITS_DIFF=str(diff), FITS_Solution=None,
                          ForceConv="AUTO", GKerHW=None, KerHWRatio=2.0, KerHWLimit=(2, 20), KerPolyOrder=2,
                          BGPolyOrder=0, ConstPhotRatio=True, MaskSatContam=False, GAIN_KEY="GAIN",
                          SATUR_KEY="SATURATE", BACK_TYPE="MANUAL", BACK_VALUE=0.0, BACK_SIZE=64,
                          BACK_FILTERSIZE=3, DETECT_THRESH=2.0, DETECT_MINAREA=5, DETECT_MAXAREA=0,
                          DEBLEND_MINCONT=0.005, BACKPHOTO_TYPE="LOCAL", ONLY_FLAGS=[0], BoundarySIZE=30,
                          XY_PriorSelect=None, Hough_MINFR=0.1, Hough_PeakClip=0.7, BeltHW=0.2,
                          PointSource_MINELLIP=0.3, MatchTol=None, MatchTolFactor=3.0, COARSE_VAR_REJECTION=True,
                          CVREJ_MAGD_THRESH=0.12, ELABO_VAR_REJECTION=False, EVREJ_RATIO_THREH=5.0,
                          EVREJ_SAFE_MAGDEV=0.04, StarExt_iter=4, XY_PriorBan=None, PostAnomalyCheck=False,
                          PAC_RATIO_THRESH=5.0, BACKEND_4SUBTRACT="Numpy", CUDA_DEVICE_4SUBTRACT="0",
                          NUM_CPU_THREADS_4SUBTRACT=1, VERBOSE_LEVEL=1)
    seconds = time.perf_counter() - t0
    return fits.getdata(diff).astype(np.float32), seconds


def run_zogy(pair, work):
    from properimage import operations

    ref = np.where(pair["bad"], 0.0, pair["tmpl"]).astype(np.float64)
    new = np.where(pair["bad"], 0.0, pair["sci"]).astype(np.float64)
    t0 = time.perf_counter()
    result = operations.subtract(ref=ref, new=new, smooth_psf=False, fitted_psf=True, iterative=False, beta=True,
                                 shift=False)
    seconds = time.perf_counter() - t0
    D = np.asarray(result[0])
    D = np.abs(D) * np.sign(D.real) if np.iscomplexobj(D) else D
    return np.asarray(D, dtype=np.float32), seconds


def main():
    p = argparse.ArgumentParser()
    p.add_argument("pair")
    p.add_argument("--method", choices=["diapipe", "sfft", "zogy"], required=True)
    a = p.parse_args()
    pair = dict(np.load(Path(a.pair) / "pair.npz"))
    work = Path(tempfile.mkdtemp(prefix=f"peer_{a.method}_"))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # sfft calls `sex`/`source-extractor` from PATH; setup.sh links it into the venv's bin
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    if a.method == "diapipe":
        score(pair["diff"], pair["bad"], pair, "diapipe", float("nan"),
              {"note": "time: the chain's subtractImages run() (see chain section)"})
        return
    diff, seconds = run_sfft(pair, work) if a.method == "sfft" else run_zogy(pair, work)
    score(diff, pair["bad"], pair, a.method, seconds)


if __name__ == "__main__":
    main()
