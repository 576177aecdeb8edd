"""Accuracy of the good-seeing template (goodSeeingCoadd) against the simulator's truth.

Issue 4's bounds: coadd photometry and astrometry as for calexps (median PSF flux / true
flux of isolated bright stars within 1 % of 1; positions < 10 mas RMS), no truth transient
present in the template above 3σ, and the coadd PSF within 3 % of the measured sizes of
stars in the coadd.

The array-level function is `coadd_metrics`; `coadd_metrics_for` reads the coadd, the
tract's ``truth_sky`` and (for which transients could have leaked) the input visits'
``truth_source`` tables from a butler.
"""

from __future__ import annotations

import numpy as np

from .truth_match import isolated, match_xy

__all__ = ["coadd_metrics", "coadd_metrics_for", "local_psf", "transient_leak_metrics"]

_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def local_psf(psf, xy0):
    """The coadd PSF seen from array indices: a coadd's `PixelPsf` lives in parent (tract)
    pixels (its bbox starts at ``xy0``), while `measure_sources` / `forced_measure` pass
    positions within the array. Evaluated at array indices, a spatially varying coadd PSF
    would be extrapolated to a point ~``xy0`` pixels away from the patch."""
    from ..exposure.psf import PixelPsf

    x0, y0 = xy0
    b = psf.bbox
    return PixelPsf(psf.basis, psf.order, (b[0] - x0, b[1] - y0, b[2] - x0, b[3] - y0))


def _mag_to_njy(mag):
    return 10 ** ((31.4 - np.asarray(mag, float)) / 2.5)


def transient_leak_metrics(image, variance, mask, psf, x, y, *, mirror_x=None, mirror_y=None) -> dict:
    """Forced PSF S/N at truth transient positions on a template (local pixel coordinates,
    ``psf`` too: see `local_psf`).

    A hosted transient sits on a galaxy whose light is point-symmetric about its centre:
    when ``mirror_x/mirror_y`` (the transient position reflected through the host centre,
    NaN for hostless ones) are given, the flux there is subtracted, which removes the host
    and leaves only leaked transient light (the error grows by ~√2).

    Returns ``n_transients``, ``max_snr``, ``n_above_3sigma``, ``snr`` (list).
    """
    from ..measure.measurement import forced_measure

    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if x.size == 0:
        return {"n_transients": 0, "max_snr": float("nan"), "n_above_3sigma": 0, "snr": []}
    here = forced_measure(image, variance, mask, psf, x, y)
    flux = np.asarray(here["psfFlux"], float)
    err = np.asarray(here["psfFluxErr"], float)
    if mirror_x is not None:
        mx = np.asarray(mirror_x, float)
        my = np.asarray(mirror_y, float)
        hosted = np.isfinite(mx) & np.isfinite(my)
        if hosted.any():
            there = forced_measure(image, variance, mask, psf, mx[hosted], my[hosted])
            flux[hosted] -= np.asarray(there["psfFlux"], float)
            err[hosted] = np.hypot(err[hosted], np.asarray(there["psfFluxErr"], float))
    snr = flux / err
    ok = np.isfinite(snr)
    return {
        "n_transients": int(ok.sum()),
        "max_snr": float(np.max(snr[ok])) if ok.any() else float("nan"),
        "n_above_3sigma": int(np.sum(snr[ok] > 3.0)),
        "snr": [float(v) for v in snr[ok]],
    }


def coadd_metrics(coadd, truth_sky, band: str, *, leak_ids=None, n_image=None, min_n_image: int = 3,
                  min_snr: float = 50.0, detection_threshold: float = 5.0, match_radius_pix: float = 2.0) -> dict:
    """Photometry, astrometry, PSF size and transient leakage of one coadd.

    Parameters
    ----------
    coadd : `diapipe.exposure.Exposure`
        The template (nJy per pixel, WCS and PSF in parent/tract pixels, ``xy0``).
    truth_sky : `pandas.DataFrame`
        The tract's sky catalogue (``truth_sky``): id, type, ra, dec, mag_<band>, host_id.
    band : `str`
    leak_ids : array-like, optional
        Transients that were on (flux > 0) in at least one input visit: only those can
        leak. Default: every transient on the coadd.
    n_image : `numpy.ndarray`, optional
        Inputs per coadd pixel (goodSeeingCoadd_nImage). Transients where fewer than
        ``min_n_image`` inputs overlap are counted apart (``transient_low_coverage_*``):
        with one or two epochs no outlier rejection can tell a transient from a star.
    min_snr : `float`
        S/N cut of the bright stars used for photometry, astrometry and PSF size.

    Returns
    -------
    dict
        ``flux_ratio_median`` (coadd PSF flux / true flux of isolated bright stars),
        ``position_rms_mas`` (measured vs true position of the same stars),
        ``centroid_err_rms_mas`` (their expected centroid noise), ``psf_size_ratio``
        (median of coadd-PSF adaptive FWHM / star adaptive FWHM), ``n_stars``, and the
        `transient_leak_metrics` keys prefixed ``transient_``.
    """
    from ..calibrate.psf_model import adaptive_fwhm
    from ..measure.detection import detect_sources
    from ..measure.measurement import measure_sources

    image, variance, mask, psf, wcs = coadd.image, coadd.variance, coadd.mask, coadd.psf, coadd.wcs
    x0, y0 = coadd.xy0
    ny, nx = image.shape
    finite = np.isfinite(image) & np.isfinite(variance)
    image = np.where(finite, image, 0.0).astype(np.float32)
    variance = np.where(finite, variance, np.inf).astype(np.float32)
    # measurements take array positions; the coadd PSF is in parent pixels
    psf_local = local_psf(psf, (x0, y0))
    footprints = detect_sources(image, variance, mask, psf.sigma(*_centre(coadd)), detection_threshold,
                                polarity="positive")
    cat = measure_sources(image, variance, mask, psf_local, footprints)
    if coadd.metadata.get("AP_CORR") is not None and len(cat):
        # PSF flux -> total flux, as on calexps (the coadd's correction is in parent pixels)
        from ..calibrate.aperture_correction import ApertureCorrection, apply_aperture_correction

        cat["psfFlux"], cat["psfFluxErr"] = apply_aperture_correction(
            cat["psfFlux"], cat["psfFluxErr"], np.asarray(cat["centroid_x"], float) + x0,
            np.asarray(cat["centroid_y"], float) + y0, ApertureCorrection.from_dict(coadd.metadata["AP_CORR"]))

    flux_col = f"mag_{band}"
    kind = truth_sky["type"].to_numpy(str)
    tx, ty = wcs.all_world2pix(truth_sky["ra"].to_numpy(float), truth_sky["dec"].to_numpy(float), 0)
    tx, ty = np.asarray(tx) - x0, np.asarray(ty) - y0
    tflux = _mag_to_njy(truth_sky[flux_col].to_numpy(float))
    tflux[kind == "transient"] = 0.0  # not in a template (their reference flux)
    tflux[~np.isfinite(tflux)] = 0.0
    on = (tx > 15) & (tx < nx - 16) & (ty > 15) & (ty < ny - 16)
    fwhm = psf.fwhm()
    # constant stars only: a variable's coadd flux is its mean over a few epochs, not its mean flux
    star = (kind == "star") & on & (tflux > 0)
    if star.any():
        star &= isolated(tx, ty, tflux, 4.0 * adaptive_fwhm(psf.compute_kernel_image(*_centre(coadd))),
                         flux_ratio=0.01)
    rows = np.flatnonzero(star)

    snr = np.asarray(cat["psfFlux"], float) / np.asarray(cat["psfFluxErr"], float)
    flagged = np.zeros(len(cat), bool)
    for name in ("flag_edge", "flag_saturated", "flag_bad", "flag_noData", "flag_psfFlux"):
        if name in cat.colnames:
            flagged |= np.asarray(cat[name], bool)
    good = np.flatnonzero((snr > min_snr) & ~flagged)
    i_cat, i_truth, _ = match_xy(np.asarray(cat["centroid_x"], float)[good], np.asarray(cat["centroid_y"], float)[good],
                                 tx[rows], ty[rows], match_radius_pix)
    ci, ti = good[i_cat], rows[i_truth]
    ratio = np.asarray(cat["psfFlux"], float)[ci] / tflux[ti]
    mx = np.asarray(cat["centroid_x"], float)[ci] + x0
    my = np.asarray(cat["centroid_y"], float)[ci] + y0
    ra, dec = wcs.all_pix2world(mx, my, 0)
    tra = truth_sky["ra"].to_numpy(float)[ti]
    tdec = truth_sky["dec"].to_numpy(float)[ti]
    dra = ((ra - tra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(tdec)) * 3.6e6
    ddec = (dec - tdec) * 3.6e6
    scale_mas = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3.6e6)
    cerr = np.hypot(np.asarray(cat["centroid_xErr"], float)[ci], np.asarray(cat["centroid_yErr"], float)[ci]) * scale_mas

    sxx, syy, sxy = (np.asarray(cat[c], float)[ci] for c in ("shape_xx", "shape_yy", "shape_xy"))
    star_fwhm = _FWHM_PER_SIGMA * np.clip(sxx * syy - sxy**2, 0, None) ** 0.25
    psf_fwhm = np.array([adaptive_fwhm(psf.compute_kernel_image(px, py)) for px, py in zip(mx, my, strict=True)])
    size_ok = np.isfinite(star_fwhm) & (star_fwhm > 0)

    out = {
        "n_detections": len(cat),
        "n_stars": int(ratio.size),
        "flux_ratio_median": float(np.median(ratio)) if ratio.size else float("nan"),
        "position_rms_mas": float(np.sqrt(np.mean(dra**2 + ddec**2))) if ratio.size else float("nan"),
        "position_mean_dra_mas": float(np.mean(dra)) if ratio.size else float("nan"),
        "position_mean_ddec_mas": float(np.mean(ddec)) if ratio.size else float("nan"),
        "centroid_err_rms_mas": float(np.sqrt(np.mean(cerr**2))) if ratio.size else float("nan"),
        "psf_size_ratio": float(np.median(psf_fwhm[size_ok] / star_fwhm[size_ok])) if size_ok.any() else float("nan"),
        "psf_fwhm_pix": float(np.median(psf_fwhm)) if psf_fwhm.size else float(fwhm),
    }

    # transients that could have leaked into the template
    trans = np.flatnonzero((kind == "transient") & on)
    if leak_ids is not None:
        trans = trans[np.isin(truth_sky["id"].to_numpy()[trans], np.asarray(leak_ids))]
    host = truth_sky["host_id"].to_numpy()[trans]
    by_id = {int(i): k for k, i in enumerate(truth_sky["id"].to_numpy())}
    mirror_x = np.full(trans.size, np.nan)
    mirror_y = np.full(trans.size, np.nan)
    for k, h in enumerate(host):
        if h >= 0 and int(h) in by_id:
            j = by_id[int(h)]
            mirror_x[k] = 2 * tx[j] - tx[trans[k]]
            mirror_y[k] = 2 * ty[j] - ty[trans[k]]
    deep = np.ones(trans.size, bool)
    if n_image is not None:
        ix = np.clip(np.round(tx[trans]).astype(int), 0, nx - 1)
        iy = np.clip(np.round(ty[trans]).astype(int), 0, ny - 1)
        deep = np.asarray(n_image)[iy, ix] >= min_n_image
    leak = transient_leak_metrics(image, variance, mask, psf_local, tx[trans][deep], ty[trans][deep],
                                  mirror_x=mirror_x[deep], mirror_y=mirror_y[deep])
    out.update({f"transient_{k}": v for k, v in leak.items() if k != "snr"})
    out["transient_ids"] = [int(i) for i in truth_sky["id"].to_numpy()[trans][deep]]
    out["transient_snr"] = leak["snr"]
    shallow = transient_leak_metrics(image, variance, mask, psf_local, tx[trans][~deep], ty[trans][~deep],
                                     mirror_x=mirror_x[~deep], mirror_y=mirror_y[~deep])
    out["transient_low_coverage_n"] = shallow["n_transients"]
    out["transient_low_coverage_n_above_3sigma"] = shallow["n_above_3sigma"]
    return out


def _centre(exposure):
    x0, y0 = exposure.xy0
    ny, nx = exposure.shape
    return x0 + 0.5 * (nx - 1), y0 + 0.5 * (ny - 1)


def coadd_metrics_for(butler, *, skymap: str, tract: int, patch: int, band: str,
                      coadd_name: str = "goodSeeingCoadd") -> dict:
    """`coadd_metrics` of one template; transients that can leak are those with flux > 0 in a
    ``truth_source`` of one of the coadd's input visits (``COADD_VISITS`` in its metadata, else ``goodSeeingVisits``)."""
    coadd = butler.get(coadd_name, skymap=skymap, tract=tract, patch=patch, band=band)
    truth_sky = butler.get("truth_sky", skymap=skymap, tract=tract)
    visits = coadd.metadata.get("COADD_VISITS")
    if not isinstance(visits, (list, tuple)):
        # the selection itself, when the coadd's header did not keep the list
        visits = []
        for ref in butler.registry.queryDatasets("goodSeeingVisits", skymap=skymap, tract=tract, patch=patch,
                                                 band=band, findFirst=True, collections=butler.collections.defaults):
            visits += [int(v) for v, keep in butler.get(ref).items() if keep]
    visits = [int(v) for v in visits]
    leak_ids = set()
    for visit in visits:
        for ref in butler.registry.queryDatasets("truth_source", where=f"visit = {visit}", findFirst=True,
                                                 collections=butler.collections.defaults):
            truth = butler.get(ref)
            on = (truth["type"] == "transient").to_numpy() & (truth["flux_njy"].to_numpy(float) > 0)
            leak_ids.update(int(i) for i in truth["id"].to_numpy()[on])
    n_image = butler.get(f"{coadd_name}_nImage", skymap=skymap, tract=tract, patch=patch, band=band).image
    out = coadd_metrics(coadd, truth_sky, band, leak_ids=sorted(leak_ids), n_image=n_image)
    out["n_input_visits"] = len(visits)
    out["n_leak_candidates"] = len(leak_ids)
    return out
