"""Accuracy of single-frame processing (ISR, PSF, astrometry, photometry) against the
simulator's truth.

Each metric is a plain function on arrays returning a dict of numbers; the ``*_for``
wrappers read one detector-visit from a butler (``postISRCCD``/``icExp``/``calexp``/``src``
from the pipeline's collection, ``truth_source``/``truth_summary``/``truth_psf`` from
``2.2i/truth``) and call them. The bounds these numbers are judged against are issue 4's:

- ISR: binned residual structure on blank sky < 0.2 % of the sky level; normalised
  residual ``(pixel - sky) / sqrt(variance)`` has std 1.00 ± 0.05;
- PSF: adaptive-moment FWHM of the model within 2 % of the truth PSF's (median);
  bright-star chi²/dof against the model ≈ 1;
- astrometry: fitted WCS vs true WCS < 10 mas RMS over the detector;
- photometry: zero point within 5 mmag; median PSF flux / true flux of isolated
  bright stars within 1 % of 1.
"""

from __future__ import annotations

import numpy as np

from ..exposure.masks import any_set
from .truth_match import blank_sky_mask, isolated, match_xy

__all__ = [
    "ISR_EXCLUDED_PLANES",
    "astrometry_metrics",
    "astrometry_metrics_for",
    "isr_metrics",
    "isr_metrics_for",
    "photometry_metrics",
    "photometry_metrics_for",
    "psf_metrics",
    "psf_metrics_for",
    "psf_star_residual_metrics",
    "truth_blank_sky",
]

#: Pixels with these planes carry no usable data for the blank-sky statistics (defects,
#: saturation and interpolated or cosmic-ray pixels are flagged, not measured).
ISR_EXCLUDED_PLANES = ("BAD", "SAT", "NO_DATA", "EDGE", "INTRP", "CR", "SUSPECT")


def _galaxy_extra_radius(truth, pixel_scale_arcsec: float, truth_sky=None, n_hlr: float = 6.0):
    """Per truth object, extra mask radius (px) for extended galaxies: ``n_hlr`` half-light
    radii from ``truth_sky`` when given, else a flat 3" for every galaxy."""
    extra = np.zeros(len(truth))
    is_gal = (truth["type"] == "galaxy").to_numpy()
    if truth_sky is not None and {"hlr_disk_arcsec", "hlr_bulge_arcsec"} <= set(truth_sky.columns):
        hlr = truth_sky.set_index("id")[["hlr_disk_arcsec", "hlr_bulge_arcsec"]].max(axis=1)
        size = hlr.reindex(truth["id"].to_numpy()).to_numpy(float)
        extra = np.where(is_gal, n_hlr * np.nan_to_num(size, nan=1.0) / pixel_scale_arcsec, 0.0)
    else:
        extra[is_gal] = 3.0 / pixel_scale_arcsec
    return extra


def truth_blank_sky(shape, truth, fwhm_pix: float, *, level_e: float = 0.05, pixel_scale_arcsec: float = 0.2,
                    truth_sky=None, xy0=(0, 0)) -> np.ndarray:
    """Blank-sky pixels of a detector-visit from its ``truth_source`` table (see
    `blank_sky_mask`); every drawn object counts, including those just off the image."""
    drawn = truth["flux_e"].to_numpy(float) > 0
    extra = _galaxy_extra_radius(truth, pixel_scale_arcsec, truth_sky)
    return blank_sky_mask(
        shape,
        truth["x"].to_numpy(float)[drawn],
        truth["y"].to_numpy(float)[drawn],
        truth["flux_e"].to_numpy(float)[drawn],
        fwhm_pix,
        level_e=level_e,
        extra_radius_pix=extra[drawn],
        xy0=xy0,
    )


# ---------------------------------------------------------------------------
# ISR
# ---------------------------------------------------------------------------
def isr_metrics(image_e, variance, mask, sky_level_e: float, blank, *, bin_size: int = 100,
                clip_sigma: float = 5.0, extra_bad=None) -> dict:
    """Residual instrumental structure and noise calibration of an ISR-corrected image.

    The model of a blank-sky pixel is the true flat sky ``sky_level_e``: anything ISR
    leaves (bias structure, dark, flat-field errors, amplifier offsets) shows as structure
    in ``image - sky``.

    Parameters
    ----------
    image_e, variance : `numpy.ndarray`
        postISRCCD image and variance (electrons, electrons²).
    mask : `numpy.ndarray` of int32
        Its mask; planes in `ISR_EXCLUDED_PLANES` are left out.
    sky_level_e : `float`
        True sky per pixel.
    blank : `numpy.ndarray` of bool
        Pixels far from every truth source (`truth_blank_sky`).
    bin_size : `int`
        Side of the square bins whose mean residuals measure the structure.
    clip_sigma : `float`
        Pixels more than this many sigma from the model (cosmic rays that ISR does not
        repair) are dropped before the statistics; the dropped fraction is reported.
    extra_bad : `numpy.ndarray` of bool, optional
        Further pixels to leave out (e.g. characterizeImage's CR mask).

    Returns
    -------
    dict
        ``structure_frac``: RMS over bins of the bin-mean residual, with the expected
        pixel-noise contribution removed in quadrature, divided by the sky level (target
        < 0.002); ``structure_raw_frac``: the same without the noise removal;
        ``max_bin_frac``: largest |bin mean| / sky; ``offset_frac``: mean residual / sky;
        ``norm_residual_std`` / ``norm_residual_mean``: of (image − sky)/sqrt(variance)
        (target std 1.00 ± 0.05); ``n_pixels``, ``n_bins``, ``clipped_frac``.
    """
    image_e = np.asarray(image_e, float)
    variance = np.asarray(variance, float)
    use = np.asarray(blank, bool) & np.isfinite(image_e) & np.isfinite(variance) & (variance > 0)
    use &= ~any_set(np.asarray(mask), ISR_EXCLUDED_PLANES)
    if extra_bad is not None:
        use &= ~np.asarray(extra_bad, bool)
    resid = image_e - sky_level_e
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = resid / np.sqrt(variance)
    n_before = int(use.sum())
    if n_before < 100:
        raise ValueError(f"only {n_before} blank-sky pixels left for the ISR metrics")
    for _ in range(5):
        centre = np.median(norm[use])
        keep = use & (np.abs(norm - centre) < clip_sigma)
        if keep.sum() == use.sum():
            break
        use = keep
    ny, nx = image_e.shape
    means, noise2 = [], []
    for y0 in range(0, ny - bin_size // 2, bin_size):
        for x0 in range(0, nx - bin_size // 2, bin_size):
            sl = (slice(y0, min(y0 + bin_size, ny)), slice(x0, min(x0 + bin_size, nx)))
            u = use[sl]
            n = int(u.sum())
            if n < 0.1 * bin_size**2:
                continue
            means.append(resid[sl][u].mean())
            noise2.append(variance[sl][u].mean() / n)
    means = np.asarray(means)
    noise2 = np.asarray(noise2)
    centred = means - means.mean() if means.size > 1 else means * 0.0
    raw_rms = float(np.sqrt(np.mean(centred**2))) if means.size else float("nan")
    excess = float(np.sqrt(max(np.mean(centred**2) - np.mean(noise2) * (1 - 1 / max(means.size, 1)), 0.0)))
    return {
        "sky_level_e": float(sky_level_e),
        "offset_frac": float(resid[use].mean() / sky_level_e),
        "structure_frac": excess / sky_level_e,
        "structure_raw_frac": raw_rms / sky_level_e,
        "bin_noise_frac": float(np.sqrt(np.mean(noise2)) / sky_level_e) if means.size else float("nan"),
        "max_bin_frac": float(np.max(np.abs(centred)) / sky_level_e) if means.size else float("nan"),
        "norm_residual_std": float(np.std(norm[use])),
        "norm_residual_mean": float(np.mean(norm[use])),
        "n_pixels": int(use.sum()),
        "n_bins": int(means.size),
        "clipped_frac": float(1.0 - use.sum() / n_before),
    }


# ---------------------------------------------------------------------------
# PSF
# ---------------------------------------------------------------------------
def _grid(shape, n: int, xy0=(0, 0), margin_frac: float = 0.05):
    ny, nx = shape
    gx = xy0[0] + np.linspace(margin_frac * (nx - 1), (1 - margin_frac) * (nx - 1), n)
    gy = xy0[1] + np.linspace(margin_frac * (ny - 1), (1 - margin_frac) * (ny - 1), n)
    xx, yy = np.meshgrid(gx, gy)
    return xx.ravel(), yy.ravel()


def psf_metrics(model_psf, true_psf, shape, *, n_grid: int = 3, xy0=(0, 0)) -> dict:
    """PSF model size against the true PSF over an ``n_grid`` x ``n_grid`` grid.

    Size is the adaptive-moment (Gaussian-weighted, as HSM) FWHM of each kernel image —
    the same definition for both, insensitive to the kernels' different sizes and to the
    Moffat wings that dominate unweighted moments. The unweighted `PixelPsf.fwhm` ratio is
    reported too, for reference.

    Returns
    -------
    dict
        ``fwhm_model_pix``, ``fwhm_true_pix`` (grid means), ``fwhm_ratio`` (mean of
        model/true over the grid), ``fwhm_ratio_max_dev`` (largest |ratio − 1| on the
        grid), ``unweighted_fwhm_ratio``.
    """
    from ..calibrate.psf_model import adaptive_fwhm

    def fwhm_or_nan(psf, x, y):
        # a kernel whose adaptive moments diverge is itself a bad model: NaN fails the bound
        try:
            return adaptive_fwhm(psf.compute_kernel_image(x, y))
        except ValueError:
            return np.nan

    xs, ys = _grid(shape, n_grid, xy0)
    model = np.array([fwhm_or_nan(model_psf, x, y) for x, y in zip(xs, ys, strict=True)])
    true = np.array([fwhm_or_nan(true_psf, x, y) for x, y in zip(xs, ys, strict=True)])
    ratio = model / true
    unweighted = np.array([model_psf.fwhm(x, y) / true_psf.fwhm(x, y) for x, y in zip(xs, ys, strict=True)])
    return {
        "fwhm_model_pix": float(model.mean()),
        "fwhm_true_pix": float(true.mean()),
        "fwhm_ratio": float(ratio.mean()),
        "fwhm_ratio_max_dev": float(np.max(np.abs(ratio - 1.0))),
        "unweighted_fwhm_ratio": float(unweighted.mean()),
    }


def _bright_isolated_stars(truth, shape, fwhm_pix, *, min_flux_e: float, max_flux_e: float, xy0=(0, 0),
                           edge_pix: float = 15.0):
    """Rows of ``truth`` that are stars (constant or variable), on the image away from its
    edges, within the flux range, with no neighbour above 1 % of their flux within 4 FWHM."""
    ny, nx = shape
    x = truth["x"].to_numpy(float) - xy0[0]
    y = truth["y"].to_numpy(float) - xy0[1]
    flux = truth["flux_e"].to_numpy(float)
    kind = truth["type"].to_numpy(str)
    star = np.isin(kind, ["star", "variable"])
    inside = (x > edge_pix) & (x < nx - 1 - edge_pix) & (y > edge_pix) & (y < ny - 1 - edge_pix)
    iso = isolated(x, y, flux, 4.0 * fwhm_pix, flux_ratio=0.01)
    return np.flatnonzero(star & inside & iso & (flux > min_flux_e) & (flux < max_flux_e))


def psf_star_residual_metrics(image, variance, mask, psf, truth, *, fwhm_pix: float, min_snr: float = 50.0,
                              max_flux_e: float = 2.0e6, xy0=(0, 0)) -> dict:
    """Chi²/dof of bright isolated truth stars against the PSF model (position and flux
    fitted; `diapipe.calibrate.psf_model.psf_residuals`), on a background-subtracted image.

    A correct model and variance give median chi²/dof ≈ 1 whatever the brightness.
    Stars brighter than ``max_flux_e`` (near saturation) are left out.
    """
    from ..calibrate.psf_model import psf_residuals

    sky_sigma = float(np.sqrt(np.nanmedian(variance)))
    # S/N of a PSF fit in the background limit: F / (sqrt(4 pi) sigma_psf sky_sigma)
    min_flux = min_snr * np.sqrt(4.0 * np.pi) * (fwhm_pix / 2.3548) * sky_sigma
    rows = _bright_isolated_stars(truth, image.shape, fwhm_pix, min_flux_e=min_flux, max_flux_e=max_flux_e, xy0=xy0)
    if len(rows) == 0:
        return {"n_stars": 0, "chi2_dof_median": float("nan"), "chi2_dof_mean": float("nan")}
    xy = np.column_stack([truth["x"].to_numpy(float)[rows] - xy0[0], truth["y"].to_numpy(float)[rows] - xy0[1]])
    res = psf_residuals(image, variance, mask, psf, xy)
    chi = np.asarray(res["chi2_dof"], float)
    chi = chi[np.isfinite(chi)]
    return {
        "n_stars": int(chi.size),
        "chi2_dof_median": float(np.median(chi)) if chi.size else float("nan"),
        "chi2_dof_mean": float(np.mean(chi)) if chi.size else float("nan"),
    }


# ---------------------------------------------------------------------------
# astrometry
# ---------------------------------------------------------------------------
def astrometry_metrics(wcs, true_wcs, shape, *, n_grid: int = 10, xy0=(0, 0)) -> dict:
    """Sky separation between a fitted WCS and the true one over an ``n_grid`` x ``n_grid``
    grid covering the detector (edges included).

    Returns ``rms_mas``, ``max_mas``, ``mean_dra_mas``, ``mean_ddec_mas`` (the mean offset:
    a pointing error), ``rms_after_shift_mas`` (what is left once that is removed).
    """
    xs, ys = _grid(shape, n_grid, xy0, margin_frac=0.0)
    ra1, dec1 = wcs.all_pix2world(xs, ys, 0)
    ra0, dec0 = true_wcs.all_pix2world(xs, ys, 0)
    dra = ((ra1 - ra0 + 180.0) % 360.0 - 180.0) * np.cos(np.radians(dec0)) * 3.6e6
    ddec = (dec1 - dec0) * 3.6e6
    sep = np.hypot(dra, ddec)
    sep_shift = np.hypot(dra - dra.mean(), ddec - ddec.mean())
    return {
        "rms_mas": float(np.sqrt(np.mean(sep**2))),
        "max_mas": float(np.max(sep)),
        "mean_dra_mas": float(dra.mean()),
        "mean_ddec_mas": float(ddec.mean()),
        "rms_after_shift_mas": float(np.sqrt(np.mean(sep_shift**2))),
    }


# ---------------------------------------------------------------------------
# photometry
# ---------------------------------------------------------------------------
def zero_point_offset_mmag(calibration_njy_per_e: float, true_calibration_njy_per_e: float) -> float:
    """2.5 log10(measured / true calibration) in mmag: positive when calibrated fluxes are
    too bright."""
    return float(2500.0 * np.log10(calibration_njy_per_e / true_calibration_njy_per_e))


def photometry_metrics(calibration_njy_per_e: float, true_calibration_njy_per_e: float, src, truth, *,
                       wcs=None, shape, fwhm_pix: float, min_snr: float = 50.0, match_radius_pix: float = 2.0,
                       xy0=(0, 0)) -> dict:
    """Zero point against truth and PSF flux / true flux of isolated bright stars.

    ``src`` must have ``centroid_x/y``, ``psfFlux_nJy``, ``psfFluxErr_nJy`` and flag columns;
    ``truth`` is the detector-visit's ``truth_source`` (``flux_njy`` at this visit). Stars
    are matched in pixel coordinates (true positions), within ``match_radius_pix``.

    Returns ``zp_offset_mmag`` and ``flux_ratio_median`` (with ``flux_ratio_mad`` and
    ``n_stars``).
    """
    out = {"zp_offset_mmag": zero_point_offset_mmag(calibration_njy_per_e, true_calibration_njy_per_e)}
    snr = np.asarray(src["psfFlux_nJy"], float) / np.asarray(src["psfFluxErr_nJy"], float)
    flagged = np.zeros(len(src), bool)
    for name in ("flag_edge", "flag_saturated", "flag_interpolatedCenter", "flag_bad", "flag_psfFlux", "flag_cr"):
        if name in src.colnames:
            flagged |= np.asarray(src[name], bool)
    good = np.flatnonzero((snr > min_snr) & ~flagged)
    rows = _bright_isolated_stars(truth, shape, fwhm_pix, min_flux_e=0.0, max_flux_e=np.inf, xy0=xy0)
    tx = truth["x"].to_numpy(float)[rows]
    ty = truth["y"].to_numpy(float)[rows]
    i_src, i_truth, _ = match_xy(np.asarray(src["centroid_x"], float)[good], np.asarray(src["centroid_y"], float)[good],
                                 tx, ty, match_radius_pix)
    ratio = np.asarray(src["psfFlux_nJy"], float)[good][i_src] / truth["flux_njy"].to_numpy(float)[rows][i_truth]
    out.update(
        {
            "n_stars": int(ratio.size),
            "flux_ratio_median": float(np.median(ratio)) if ratio.size else float("nan"),
            "flux_ratio_mad": float(1.4826 * np.median(np.abs(ratio - np.median(ratio)))) if ratio.size else float("nan"),
        }
    )
    return out


# ---------------------------------------------------------------------------
# butler wrappers
# ---------------------------------------------------------------------------
def _visit_detector(data_id) -> dict:
    return {"instrument": data_id["instrument"], "visit": data_id["visit"], "detector": data_id["detector"]}


def _fwhm_true(summary) -> float:
    return float(summary["psf_fwhm_px"])


def isr_metrics_for(butler, data_id, *, bin_size: int = 100, truth_sky=None) -> dict:
    """`isr_metrics` of one detector-visit's postISRCCD (``data_id``: instrument, visit or
    exposure, detector); characterizeImage's CR mask (icExp) is excluded when present."""
    ids = dict(data_id)
    exposure_id = ids.get("exposure", ids.get("visit"))
    visit_id = ids.get("visit", exposure_id)
    vd = {"instrument": ids["instrument"], "visit": visit_id, "detector": ids["detector"]}
    post = butler.get("postISRCCD", instrument=ids["instrument"], exposure=exposure_id, detector=ids["detector"])
    summary = butler.get("truth_summary", vd)
    truth = butler.get("truth_source", vd)
    blank = truth_blank_sky(post.shape, truth, _fwhm_true(summary), truth_sky=truth_sky, xy0=post.xy0)
    extra = None
    try:
        ic_mask = butler.get("icExp", vd, parameters=None).mask
        extra = any_set(ic_mask, ["CR"])
    except LookupError:
        pass
    return isr_metrics(post.image, post.variance, post.mask, summary["sky_level_e"], blank, bin_size=bin_size,
                       extra_bad=extra)


def psf_metrics_for(butler, data_id) -> dict:
    """`psf_metrics` and `psf_star_residual_metrics` of one calexp."""
    vd = _visit_detector(data_id)
    calexp = butler.get("calexp", vd)
    true_psf = butler.get("truth_psf", vd)
    summary = butler.get("truth_summary", vd)
    truth = butler.get("truth_source", vd)
    out = psf_metrics(calexp.psf, true_psf, calexp.shape, xy0=calexp.xy0)
    stars = psf_star_residual_metrics(calexp.image, calexp.variance, calexp.mask, calexp.psf, truth,
                                      fwhm_pix=_fwhm_true(summary), xy0=calexp.xy0)
    out.update({f"star_{k}": v for k, v in stars.items()})
    # the same stars against the true PSF: what a perfect model would score on this image
    control = psf_star_residual_metrics(calexp.image, calexp.variance, calexp.mask, true_psf, truth,
                                        fwhm_pix=_fwhm_true(summary), xy0=calexp.xy0)
    out["star_chi2_dof_median_true_psf"] = control["chi2_dof_median"]
    return out


def astrometry_metrics_for(butler, data_id) -> dict:
    """`astrometry_metrics` of one calexp's WCS against ``truth_summary['true_wcs']``."""
    from ..exposure.fits import wcs_from_dict

    vd = _visit_detector(data_id)
    wcs = butler.get("calexp.wcs", vd)
    x0, y0, width, height = butler.get("calexp.bbox", vd)
    summary = butler.get("truth_summary", vd)
    return astrometry_metrics(wcs, wcs_from_dict(summary["true_wcs"]), (height, width), xy0=(x0, y0))


def photometry_metrics_for(butler, data_id) -> dict:
    """`photometry_metrics` of one calexp and its src catalogue."""
    vd = _visit_detector(data_id)
    photo_calib = butler.get("calexp.photoCalib", vd)
    x0, y0, width, height = butler.get("calexp.bbox", vd)
    summary = butler.get("truth_summary", vd)
    src = butler.get("src", vd)
    truth = butler.get("truth_source", vd)
    out = photometry_metrics(photo_calib.calibration_mean, summary["calibration_njy_per_e"], src, truth,
                             shape=(height, width), fwhm_pix=_fwhm_true(summary), xy0=(x0, y0))
    # the fit's own 1-sigma error: the offset should be consistent with it
    out["zp_err_mmag"] = float(2500.0 / np.log(10) * photo_calib.calibration_err / photo_calib.calibration_mean)
    return out
