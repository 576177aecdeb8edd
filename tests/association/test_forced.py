"""Forced PSF photometry: pulls and bias on synthetic stars; real ZTF packets."""

import gzip
import io
import math
import pathlib
import warnings

import numpy as np
import pytest
from scipy.special import erf

from diapipe.association.forced import forced_psf_flux
from diapipe.exposure.masks import bit
from diapipe.exposure.psf import PixelPsf

ZTF_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "ztf_alerts"
if not ZTF_DIR.exists():  # tests may run from /work/main or a checkout beside shared/
    ZTF_DIR = pathlib.Path("/work/shared/data/real/ztf_alerts")


def _pixel_integrated_gaussian(shape, x, y, sigma, flux):
    """A Gaussian star integrated over pixels (independent of the code under test)."""
    ny, nx = shape
    edges_x = np.arange(nx + 1) - 0.5
    edges_y = np.arange(ny + 1) - 0.5
    cx = np.diff(0.5 * (1 + erf((edges_x - x) / (math.sqrt(2) * sigma))))
    cy = np.diff(0.5 * (1 + erf((edges_y - y) / (math.sqrt(2) * sigma))))
    return flux * np.outer(cy, cx)


def _star_field(rng, n_stars=400, sigma=2.0, sky_var=100.0, flux=3000.0):
    size = 64
    xs = rng.uniform(20, size - 21, n_stars)
    ys = rng.uniform(20, size - 21, n_stars)
    fluxes = []
    meas = []
    errs = []
    # sampled-at-centre Gaussian with the pixel-integration width (σ² + 1/12)
    psf = PixelPsf.gaussian(math.sqrt(sigma**2 + 1 / 12), size=25)
    for x, y in zip(xs, ys):
        model = _pixel_integrated_gaussian((size, size), x, y, sigma, flux)
        variance = sky_var + model  # Poisson term from the *model*: an honest variance plane
        image = model + rng.normal(size=model.shape) * np.sqrt(variance)
        f, e = forced_psf_flux(image, variance, psf, [x], [y])
        fluxes.append(flux)
        meas.append(f[0])
        errs.append(e[0])
    return np.array(fluxes), np.array(meas), np.array(errs)


def test_pulls_and_bias_on_synthetic_stars():
    rng = np.random.default_rng(2024)
    truth, meas, err = _star_field(rng)
    pull = (meas - truth) / err
    assert np.std(pull, ddof=1) == pytest.approx(1.0, abs=0.1)
    assert abs(np.mean(pull)) < 0.15  # 400 stars: standard error 0.05
    assert abs(np.mean(meas) / truth[0] - 1) < 0.005


def test_faint_sources_and_pure_noise_are_unbiased():
    rng = np.random.default_rng(8)
    image = rng.normal(0, 5.0, (200, 200))
    variance = np.full(image.shape, 25.0)
    x = rng.uniform(15, 185, 300)
    y = rng.uniform(15, 185, 300)
    flux, err = forced_psf_flux(image, variance, PixelPsf.gaussian(1.8), x, y)
    pull = flux / err
    # positions overlap a little, so pulls are weakly correlated; 300 of them still pin the width
    assert np.std(pull, ddof=1) == pytest.approx(1.0, abs=0.12)
    assert abs(np.mean(pull)) < 0.2


def test_subpixel_positions_with_constant_kernel_and_pixelpsf_agree():
    psf = PixelPsf.gaussian(1.7, size=21)
    image = np.zeros((50, 50))
    x, y = 24.3, 25.6
    stamp = 1000.0 * psf.compute_image(x, y)
    image[26 - 10 : 26 + 11, 24 - 10 : 24 + 11] = stamp
    variance = np.full(image.shape, 1.0)
    f1, e1 = forced_psf_flux(image, variance, psf, [x], [y])
    f2, e2 = forced_psf_flux(image, variance, psf.compute_kernel_image(0, 0), [x], [y])
    f3, _ = forced_psf_flux(image, variance, lambda xx, yy: psf.compute_image(xx, yy), [x], [y])
    assert f1[0] == pytest.approx(1000.0, rel=1e-9)
    assert f2[0] == pytest.approx(1000.0, rel=1e-9)
    assert f3[0] == pytest.approx(1000.0, rel=1e-9)
    assert e1[0] == pytest.approx(e2[0], rel=1e-9)
    # a wrong position loses flux: the fit really uses the position
    f_off, _ = forced_psf_flux(image, variance, psf, [x + 2.0], [y])
    assert f_off[0] == pytest.approx(1000.0 * np.exp(-4 / (4 * 1.7**2)), rel=0.01)


def test_edges_masks_and_nan_pixels():
    psf = PixelPsf.gaussian(1.5, size=15)
    rng = np.random.default_rng(3)
    image = rng.normal(0, 1.0, (40, 40))
    image[15:30, 13:28] += 800.0 * psf.compute_kernel_image(0, 0)  # star at (20, 22)
    variance = np.ones_like(image)
    mask = np.zeros(image.shape, dtype=np.int32)
    flux, err, flags = forced_psf_flux(image, variance, psf, [20.0, 3.0, -30.0], [22.0, 20.0, 5.0],
                                       return_flags=True)
    assert flux[0] == pytest.approx(800.0, abs=4 * err[0])
    assert np.isnan(flux[1]) and flags["edge"][1] and not flags["no_good_pixels"][1]
    assert np.isnan(flux[2]) and flags["edge"][2] and flags["no_good_pixels"][2]
    assert flags["n_pixels"][0] == 15 * 15 and flags["n_pixels"][1] == 0
    # partial overlap allowed on request: still measured, still flagged
    fp, ep, fl = forced_psf_flux(image, variance, psf, [3.0], [20.0], allow_partial=True, return_flags=True)
    assert np.isfinite(fp[0]) and fl["edge"][0] and fl["n_pixels"][0] == 11 * 15
    # masked + NaN pixels on the core: excluded, flux still right, error larger
    mask[22, 20] = bit("SAT")
    image2 = image.copy()
    image2[22, 20] = 1e6  # a saturated core that must not leak into the flux
    image2[23, 21] = np.nan
    f2, e2 = forced_psf_flux(image2, variance, psf, [20.0], [22.0], mask=mask)
    assert f2[0] == pytest.approx(800.0, abs=4 * e2[0])
    assert e2[0] > err[0]
    # all pixels bad -> NaN with the no-good-pixels flag
    f3, _, fl3 = forced_psf_flux(image, np.zeros_like(image), psf, [20.0], [22.0], return_flags=True)
    assert np.isnan(f3[0]) and fl3["no_good_pixels"][0]
    # xy0: the same star in a sub-image with its parent coordinates
    f4, _ = forced_psf_flux(image[10:35, 8:33], variance[10:35, 8:33], psf, [20.0], [22.0], xy0=(8, 10))
    assert f4[0] == pytest.approx(flux[0], rel=1e-12)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="odd square"):
        forced_psf_flux(np.zeros((10, 10)), np.ones((10, 10)), np.ones((4, 4)), [5.0], [5.0])
    with pytest.raises(ValueError, match="same shape"):
        forced_psf_flux(np.zeros((10, 10)), np.ones((10, 9)), np.ones((3, 3)), [5.0], [5.0])


# -- real data: two ZTF alert packets -------------------------------------------------------


def _ztf_packets():
    if not ZTF_DIR.exists():
        pytest.skip(f"real ZTF alert packets not found at {ZTF_DIR} (see shared/data/real/README.md)")
    import fastavro
    from astropy.io import fits

    out = []
    for path in sorted(ZTF_DIR.glob("*.avro")):
        with open(path, "rb") as stream:
            packet = next(iter(fastavro.reader(stream)))
        cut = {}
        for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
            with warnings.catch_warnings():
                # ZTF writes SIMPLE with a non-standard layout; astropy reads it fine.
                warnings.simplefilter("ignore", fits.verify.VerifyWarning)
                cut[key] = fits.getdata(io.BytesIO(gzip.decompress(packet[key]["stampData"]))).astype(float)
        out.append((path.stem, packet["candidate"], cut))
    assert len(out) == 2, f"expected 2 ZTF packets in {ZTF_DIR}"
    return out


def _robust_sigma(values):
    return 1.4826 * np.median(np.abs(values - np.median(values)))


def _weighted_centroid(image, x, y, sigma=1.0, n_iter=10):
    """Gaussian-weighted centroid (weight width ``sigma`` px) iterated from (x, y)."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    for _ in range(n_iter):
        w = image * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
        x, y = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    return float(x), float(y)


def _empirical_psf(science, x, y, half=10, step=0.5, sky_radius=20):
    """PSF from the science cutout: azimuthal-median radial profile of the point source at
    the cutout centre (ZTF classtar ~1), about its own centroid, sampled on a kernel grid
    of radius ``half`` and normalised.

    The median over each ``step``-wide annulus rejects neighbours: the negative candidate's
    science stamp has a second star ~5 px from the centre (SExtractor's fwhm of 5.7 px is of
    that blend), which a plain pixel stamp copies into the PSF wings. ZTF PSFs are round
    (elong 1.07 and 1.16), so a radial profile loses little. The sky is the median outside
    ``sky_radius``.
    """
    yy, xx = np.mgrid[: science.shape[0], : science.shape[1]]
    background = np.median(science[np.hypot(xx - x, yy - y) > sky_radius])
    cx, cy = _weighted_centroid(science - background, x, y)
    r = np.hypot(xx - cx, yy - cy)
    radii, profile = [], []
    for lo in np.arange(0.0, half, step):
        ring = (r >= lo) & (r < lo + step)
        if ring.any():
            radii.append(r[ring].mean())
            profile.append(np.median(science[ring] - background))
    ky, kx = np.mgrid[-half : half + 1, -half : half + 1]
    rk = np.hypot(kx, ky)
    kernel = np.interp(rk, radii, profile, right=0.0)
    kernel[rk > half] = 0.0
    return kernel / kernel.sum()


def _packet_position(cand, centre):
    """Candidate position in cutout pixels: the cutout is centred on the pixel nearest the
    candidate's (xpos, ypos); their fractional parts are its sub-pixel offset."""
    return (centre + cand["xpos"] - round(cand["xpos"]), centre + cand["ypos"] - round(cand["ypos"]))


def test_ztf_packets_magpsf_reproduced():
    """forced_psf_flux at the candidate position reproduces ZTF's magpsf within sigmapsf,
    and the sign of the difference.

    The PSF is estimated from the science cutout (`_empirical_psf`: robust radial profile of
    the central star); the flux is fitted at the packet's sub-pixel position (the cutouts are
    centred on the nearest pixel, not the candidate: offsets up to 0.47 px); zero point
    ``magzpsci``. The variance is the robust background scatter of the difference cutout (no
    variance plane in ZTF cutouts). Measured: +0.42 and +0.71 sigmapsf (negative and
    positive candidate). The PSF estimate's own free choices (annulus 0.25-1 px, radius
    8-12 px, centring on the star or the candidate) move these by about +-0.5 sigmapsf, so
    1 sigmapsf is near what a PSF from one 63x63 stamp of an undersampled (FWHM ~2 px) star
    can do; ZTF's own PSF is fitted over the whole readout channel. ZTF's difference cutout
    of an 'f' (negative) candidate is the template-minus-science image; the signed
    science-minus-template flux is checked against the science and template cutouts.
    """
    offsets = {}
    for name, cand, cut in _ztf_packets():
        diff = cut["cutoutDifference"]
        yy, xx = np.mgrid[: diff.shape[0], : diff.shape[1]]
        c = diff.shape[0] // 2
        x, y = _packet_position(cand, c)
        assert abs(x - c) <= 0.5 and abs(y - c) <= 0.5
        outer = np.hypot(xx - x, yy - y) > 20
        background = np.median(diff[outer])
        variance = np.full(diff.shape, _robust_sigma(diff[outer]) ** 2)
        psf = _empirical_psf(cut["cutoutScience"], x, y)
        flux, err = forced_psf_flux(diff - background, variance, psf, [x], [y])
        assert flux[0] / err[0] > 20, name
        mag = cand["magzpsci"] - 2.5 * np.log10(abs(flux[0]))
        offsets[name] = (mag - cand["magpsf"]) / cand["sigmapsf"]
        assert abs(offsets[name]) < 1.0, (name, mag, cand["magpsf"], cand["sigmapsf"])

        # Sign: the cutout flux is positive for both; ZTF's isdiffpos says which way round it is.
        sign = 1.0 if cand["isdiffpos"] in ("t", "1") else -1.0
        signed = sign * flux[0]
        # independent check: aperture flux (r = 8 px, insensitive to the science/template PSF
        # mismatch) of science minus template, which share ZTF's photometric scale
        sci, tpl = cut["cutoutScience"], cut["cutoutTemplate"]
        s_minus_t = (sci - np.median(sci[outer])) - (tpl - np.median(tpl[outer]))
        aperture = s_minus_t[(xx - x) ** 2 + (yy - y) ** 2 <= 64].sum()
        assert np.sign(aperture) == np.sign(signed), name
        assert abs(aperture / signed - 1) < 0.3, (name, aperture, signed)
    # one positive and one negative difference were exercised
    assert {cand["isdiffpos"] for _, cand, _ in _ztf_packets()} == {"t", "f"}
    assert len(offsets) == 2


def test_ztf_aperture_flux_matches_magap():
    """The cutouts' scale and zero point, independently of any PSF: the aperture flux of
    the difference cutout at the packet position, in ZTF's 18-px-diameter aperture, reproduces
    the packet's magapbig (measured: 0.0003 and 0.016 mag off, sigmagapbig 0.006 and 0.077)."""
    for name, cand, cut in _ztf_packets():
        diff = cut["cutoutDifference"]
        yy, xx = np.mgrid[: diff.shape[0], : diff.shape[1]]
        x, y = _packet_position(cand, diff.shape[0] // 2)
        r = np.hypot(xx - x, yy - y)
        d = diff - np.median(diff[r > 20])
        flux = abs(d[r <= 9].sum())
        mag = cand["magzpsci"] - 2.5 * np.log10(flux)
        assert abs(mag - cand["magapbig"]) < max(2 * cand["sigmagapbig"], 0.01), (name, mag, cand["magapbig"])


def test_ztf_positive_packet_with_packet_fwhm_gaussian():
    """The packet's own ``fwhm`` as a Gaussian PSF: within 1 sigmapsf for the isolated
    positive transient (the negative one's fwhm, 5.7 px, is SExtractor's on a blended
    bright star and is not a PSF width)."""
    for name, cand, cut in _ztf_packets():
        if cand["isdiffpos"] != "t":
            continue
        diff = cut["cutoutDifference"]
        yy, xx = np.mgrid[: diff.shape[0], : diff.shape[1]]
        c = diff.shape[0] // 2
        outer = (xx - c) ** 2 + (yy - c) ** 2 > 15**2
        variance = np.full(diff.shape, _robust_sigma(diff[outer]) ** 2)
        psf = PixelPsf.gaussian(cand["fwhm"] / (2 * math.sqrt(2 * math.log(2))), size=31)
        flux, _ = forced_psf_flux(diff - np.median(diff[outer]), variance, psf, [float(c)], [float(c)])
        mag = cand["magzpsci"] - 2.5 * np.log10(flux[0])
        assert abs(mag - cand["magpsf"]) < cand["sigmapsf"], (name, mag, cand["magpsf"])
