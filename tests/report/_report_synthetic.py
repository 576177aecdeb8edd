"""Synthetic ApPipe outputs for the report tests, written beside the real ApTemplate run:
a ``goodSeeingDiff_diaSrcTable``, ``goodSeeingDiff_templateExp`` and
``goodSeeingDiff_differenceExp`` per calexp (collection `SYNTHETIC_COLLECTION`), and an
sqlite APDB with the DiaObject/DiaSource columns the report reads.

The DiaSources sit on the truth variables whose |difference flux| exceeds
`DETECT_NJY` (at their true positions, measured fluxes scattered by their errors), plus
`N_SPURIOUS` per detector-visit at random positions far from every truth object: the
tests know exactly how many real and spurious DiaSources there are.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd

from diapipe.exposure.exposure import Exposure

__all__ = ["DETECT_NJY", "N_SPURIOUS", "SYNTHETIC_COLLECTION", "write_synthetic_apdb", "write_synthetic_outputs"]

SYNTHETIC_COLLECTION = "u/test/report_synthetic"
DETECT_NJY = 3000.0
N_SPURIOUS = 3
_DIMS = ("instrument", "visit", "detector")


def _register(butler, name, storage_class):
    from lsst.daf.butler import DatasetType

    butler.registry.registerDatasetType(DatasetType(name, _DIMS, storage_class, universe=butler.dimensions))


def _blob(shape, x, y, flux, sigma):
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    return flux * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) / (2 * np.pi * sigma**2)


def write_synthetic_outputs(repo, input_collection: str) -> pd.DataFrame:
    """Write the synthetic datasets; returns all DiaSource rows with a ``truth_id`` column
    (-1 for the spurious ones)."""
    from lsst.daf.butler import Butler

    rng = np.random.default_rng(7)
    reader = Butler(str(repo), collections=[input_collection, "2.2i/truth"])
    refs = sorted(reader.registry.queryDatasets("calexp", findFirst=True),
                  key=lambda r: (r.dataId["visit"], r.dataId["detector"]))
    butler = Butler(str(repo), writeable=True, run=SYNTHETIC_COLLECTION)
    _register(butler, "goodSeeingDiff_diaSrcTable", "DataFrame")
    _register(butler, "goodSeeingDiff_templateExp", "DiapipeExposure")
    _register(butler, "goodSeeingDiff_differenceExp", "DiapipeExposure")
    tables = []
    for ref in refs:
        data_id = {"instrument": ref.dataId["instrument"], "visit": ref.dataId["visit"],
                   "detector": ref.dataId["detector"]}
        calexp = reader.get("calexp", data_id)
        truth = reader.get("truth_source", data_id)
        calib = calexp.photo_calib.calibration_mean  # nJy per electron
        ny, nx = calexp.shape
        noise_e = float(np.sqrt(np.nanmedian(calexp.variance)))
        sigma = calexp.psf.sigma()
        var = truth[truth.type.isin(["variable", "transient"]) & truth.on_detector
                    & (truth.diff_flux_njy.abs() > DETECT_NJY)
                    & truth.x.between(20, nx - 21) & truth.y.between(20, ny - 21)]
        # spurious positions at least 30 px (6") from every truth object
        spurious = []
        while len(spurious) < N_SPURIOUS:
            x, y = rng.uniform(30, nx - 31), rng.uniform(30, ny - 31)
            if np.min(np.hypot(truth.x - x, truth.y - y)) > 30:
                spurious.append((x, y))
        sx, sy = np.array(spurious).T
        x = np.r_[var.x.to_numpy(), sx]
        y = np.r_[var.y.to_numpy(), sy]
        true_flux = np.r_[var.diff_flux_njy.to_numpy(), rng.uniform(1500, 4000, N_SPURIOUS)]
        err = 0.05 * np.abs(true_flux) + 250.0
        flux = true_flux + rng.normal(0, err)
        ra, dec = calexp.wcs.all_pix2world(x, y, 0)
        visit, detector = int(data_id["visit"]), int(data_id["detector"])
        n = x.size
        table = pd.DataFrame({
            "diaSourceId": (np.int64(visit) << 28) | (np.int64(detector) << 20) | np.arange(1, n + 1),
            "diaObjectId": np.zeros(n, np.int64),
            "visit": np.full(n, visit, np.int64),
            "detector": np.full(n, detector, np.int16),
            "band": "g",
            "midpointMjdTai": calexp.visit_info.mjd_tai,
            "ra": ra, "dec": dec, "x": x, "y": y,
            "psfFlux": flux.astype(np.float32), "psfFluxErr": err.astype(np.float32),
            "snr": (flux / err).astype(np.float32),
        })
        butler.put(table, "goodSeeingDiff_diaSrcTable", data_id)
        difference = rng.normal(0, noise_e, calexp.shape)
        for xi, yi, fi in zip(x, y, flux, strict=True):
            x0, y0 = int(xi) - 12, int(yi) - 12
            difference[y0:y0 + 25, x0:x0 + 25] += _blob((25, 25), xi - x0, yi - y0, fi / calib, sigma)
        butler.put(Exposure(difference, calexp.mask, calexp.variance, wcs=calexp.wcs, psf=calexp.psf,
                            photo_calib=calexp.photo_calib, visit_info=calexp.visit_info, xy0=calexp.xy0),
                   "goodSeeingDiff_differenceExp", data_id)
        template = calexp.image - difference
        butler.put(Exposure(template, calexp.mask, calexp.variance, wcs=calexp.wcs, psf=calexp.psf,
                            photo_calib=calexp.photo_calib, visit_info=calexp.visit_info, xy0=calexp.xy0),
                   "goodSeeingDiff_templateExp", data_id)
        table["truth_id"] = np.r_[var.id.to_numpy(), np.full(N_SPURIOUS, -1)]
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def write_synthetic_apdb(path, sources: pd.DataFrame) -> pd.DataFrame:
    """An sqlite file with ``DiaObject`` (one current row per truth object or spurious
    source, plus one superseded row that the report must ignore) and ``DiaSource``.
    Returns the current DiaObjects with their ``truth_id``."""
    sources = sources.copy()
    key = np.where(sources.truth_id >= 0, sources.truth_id, -sources.diaSourceId)
    _, inverse = np.unique(key, return_inverse=True)
    sources["diaObjectId"] = 1000 + inverse
    grouped = sources.groupby("diaObjectId")
    objects = pd.DataFrame({
        "diaObjectId": grouped.size().index.to_numpy(np.int64),
        "validityStartMjdTai": grouped.midpointMjdTai.min().to_numpy(),
        "validityEndMjdTai": np.nan,
        "ra": grouped.ra.mean().to_numpy(),
        "dec": grouped.dec.mean().to_numpy(),
        "nDiaSources": grouped.size().to_numpy(np.int64),
        "g_psfFluxMean": grouped.psfFlux.mean().to_numpy(float),
        "g_psfFluxMeanErr": (grouped.psfFluxErr.mean() / np.sqrt(grouped.size())).to_numpy(float),
        "truth_id": grouped.truth_id.first().to_numpy(),
    })
    old = objects.iloc[[0]].copy()
    old["validityEndMjdTai"] = old["validityStartMjdTai"] + 1.0
    old["nDiaSources"] = 999  # a superseded version: must not be plotted
    with sqlite3.connect(path) as connection:
        pd.concat([old, objects]).drop(columns="truth_id").to_sql("DiaObject", connection, index=False)
        sources.drop(columns="truth_id").to_sql("DiaSource", connection, index=False)
    return objects
