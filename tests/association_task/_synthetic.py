"""Synthetic detector-visits for diaPipe tests: truth objects seen in several
visits on two slightly overlapping detectors, with difference images, calexps
and templates carrying the injected point sources."""

from __future__ import annotations

import numpy as np
import pandas as pd
from astropy.wcs import WCS

from diapipe.exposure.exposure import Exposure, PhotoCalib, VisitInfo
from diapipe.exposure.psf import PixelPsf

__all__ = ["SHAPE", "CALIB", "make_wcs", "make_truth", "make_detector_visit", "detector_visits"]

SHAPE = (160, 200)  # (ny, nx)
CALIB = 0.5  # nJy per electron
NOISE_E = 5.0
PSF_SIGMA = 1.6
RA0, DEC0 = 61.86, -35.8
SCALE_DEG = 0.2 / 3600.0


def make_wcs(detector: int) -> WCS:
    """TAN WCS at 0.2"/px; detector 1 sits 190 px east of detector 0 (10 px overlap)."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [RA0, DEC0]
    wcs.wcs.crpix = [100.0 - 190.0 * detector + 1.0, 80.0 + 1.0]
    wcs.wcs.cd = SCALE_DEG * np.array([[-1.0, 0.0], [0.0, 1.0]])
    wcs.wcs.set()
    return wcs


def make_truth(seed: int = 7, n: int = 50) -> pd.DataFrame:
    """Truth objects spread over both detectors (away from the outer edges)."""
    rng = np.random.default_rng(seed)
    wcs = make_wcs(0)
    x = rng.uniform(12, 190 + SHAPE[1] - 12, n)
    y = rng.uniform(12, SHAPE[0] - 12, n)
    ra, dec = wcs.pixel_to_world_values(x, y)
    flux = rng.uniform(800.0, 4000.0, n)  # nJy in the difference image
    return pd.DataFrame({"truthId": np.arange(n), "ra": ra, "dec": dec, "flux": flux})


def _render(shape, xs, ys, fluxes_e, psf, rng, noise):
    image = rng.normal(0.0, noise, shape)
    half = psf.kernel_size // 2 if hasattr(psf, "kernel_size") else 7
    for x, y, f in zip(xs, ys, fluxes_e):
        stamp = psf.compute_image(x, y)
        half = stamp.shape[0] // 2
        cx, cy = int(np.round(x)), int(np.round(y))
        y0, x0 = cy - half, cx - half
        sy0, sx0 = max(y0, 0), max(x0, 0)
        sy1, sx1 = min(y0 + stamp.shape[0], shape[0]), min(x0 + stamp.shape[1], shape[1])
        if sy0 >= sy1 or sx0 >= sx1:
            continue
        image[sy0:sy1, sx0:sx1] += f * stamp[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
    return image.astype(np.float32)


def make_detector_visit(truth: pd.DataFrame, visit: int, detector: int, mjd: float, seed: int,
                        p_detect: float = 0.85, n_spurious: int = 3):
    """(diaSrcTable, difference, calexp, template, truth ids of the sources)."""
    rng = np.random.default_rng(seed)
    wcs = make_wcs(detector)
    psf = PixelPsf.gaussian(PSF_SIGMA, 15)
    x, y = wcs.world_to_pixel_values(truth["ra"].to_numpy(), truth["dec"].to_numpy())
    ny, nx = SHAPE
    on = (x > 3) & (x < nx - 4) & (y > 3) & (y < ny - 4)
    seen = on & (rng.random(len(truth)) < p_detect)
    flux_e = truth["flux"].to_numpy() / CALIB * rng.uniform(0.7, 1.3, len(truth))
    diff = _render(SHAPE, x[seen], y[seen], flux_e[seen], psf, rng, NOISE_E)
    sci = _render(SHAPE, x[on], y[on], flux_e[on] + 3000.0, psf, rng, NOISE_E) 
    tmpl = _render(SHAPE, x[on], y[on], np.full(on.sum(), 3000.0), psf, rng, NOISE_E / 2)
    info = VisitInfo(instrument="LSSTCam-imSim", exposure=visit, visit=visit, detector=detector, band="g",
                     physical_filter="g_sim_1.4", exposure_time_s=30.0, mjd_tai=mjd)
    var = np.full(SHAPE, NOISE_E**2, dtype=np.float32)
    difference = Exposure(diff, None, var, wcs=wcs, psf=psf, photo_calib=PhotoCalib(CALIB), visit_info=info)
    calexp = Exposure(sci, None, var, wcs=wcs, psf=psf, photo_calib=PhotoCalib(CALIB), visit_info=info)
    template = Exposure(tmpl * CALIB, None, var / 4 * CALIB**2, wcs=wcs, psf=psf, visit_info=info)

    # DiaSources: detected truth objects with ~0.04" centroid scatter, plus spurious ones.
    idx = np.flatnonzero(seen)
    sx = x[idx] + rng.normal(0, 0.2, idx.size)
    sy = y[idx] + rng.normal(0, 0.2, idx.size)
    truth_ids = truth["truthId"].to_numpy()[idx].tolist()
    spx = rng.uniform(5, nx - 5, n_spurious)
    spy = rng.uniform(5, ny - 5, n_spurious)
    sx, sy = np.concatenate([sx, spx]), np.concatenate([sy, spy])
    truth_ids += [-1] * n_spurious
    ra, dec = wcs.pixel_to_world_values(sx, sy)
    n = sx.size
    flux = np.concatenate([flux_e[idx] * CALIB, rng.normal(0, 60, n_spurious)])
    table = pd.DataFrame({
        "diaSourceId": (visit * 10 + detector) * 1000 + np.arange(n, dtype=np.int64),
        "visit": visit, "detector": detector, "band": "g",
        "ra": ra, "dec": dec,
        "raErr": np.full(n, 0.04 / 3600), "decErr": np.full(n, 0.04 / 3600),
        "x": sx, "y": sy,
        "psfFlux": flux, "psfFluxErr": np.full(n, 25.0),
        "scienceFlux": flux + 1500.0, "scienceFluxErr": np.full(n, 30.0),
        "snr": flux / 25.0,
        "midpointMjdTai": mjd,
        "someUpstreamColumn": 1.0,  # not in the APDB schema: dropped
    })
    return table, difference, calexp, template, np.asarray(truth_ids)


def detector_visits(n_visits: int = 4, detectors=(0, 1), seed: int = 7):
    """[(visit, detector, mjd, table, difference, calexp, template, truth_ids)] in time order."""
    truth = make_truth(seed)
    out = []
    for k in range(n_visits):
        visit = 960200 + k
        mjd = 60000.0 + 3.0 * k + 0.1
        for det in detectors:
            out.append((visit, det, mjd) + make_detector_visit(truth, visit, det, mjd, seed * 1000 + k * 10 + det))
    return truth, out
