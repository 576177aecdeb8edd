"""Tests of diapipe.coadd.warp on synthetic images with known WCSs.

Truth: stars drawn as pixel-integrated Gaussians (erf differences) at known
source positions; their destination positions come from the exact WCS pair
(source rotated by 3 deg, destination pixels 2% larger).
"""

import numpy as np
import pytest
from astropy.wcs import WCS
from scipy.special import erf

from diapipe.coadd import lanczos_weights, warp_image, warp_psf
from diapipe.exposure.masks import any_set, bit
from diapipe.exposure.psf import PixelPsf

SIGMA = 2.0


def make_wcs(crpix, scale_arcsec, rot_deg, crval=(56.65, -36.45)):
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = list(crpix)
    s, t = scale_arcsec / 3600.0, np.radians(rot_deg)
    wcs.wcs.cd = np.array([[-s * np.cos(t), s * np.sin(t)], [s * np.sin(t), s * np.cos(t)]])
    wcs.wcs.set()
    return wcs


def draw_stars(shape, xs, ys, fluxes, sigma=SIGMA):
    ny, nx = shape
    img = np.zeros(shape)
    xe, ye = np.arange(nx + 1) - 0.5, np.arange(ny + 1) - 0.5
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        cx = 0.5 * np.diff(erf((xe - x) / (np.sqrt(2) * sigma)))
        cy = 0.5 * np.diff(erf((ye - y) / (np.sqrt(2) * sigma)))
        img += f * np.outer(cy, cx)
    return img


SRC = make_wcs([100.0, 100.0], 0.2, 3.0)
DST = make_wcs([95.0, 97.0], 0.2 * 1.02, 0.0)


def test_lanczos_weights_reproduce_constants_and_lines():
    frac = np.linspace(0, 0.999, 50)
    w = lanczos_weights(frac, 3, np.float64)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    offsets = np.arange(-2, 4)[:, None]
    np.testing.assert_allclose((w * offsets).sum(axis=0), frac, atol=1e-12)
    plain = lanczos_weights(frac, 3, np.float64, linear_exact=False)
    assert np.abs((plain * offsets).sum(axis=0) - frac).max() > 0.01  # why the correction exists


def test_star_positions_and_flux():
    rng = np.random.default_rng(3)
    xs = np.array([50.3, 140.7, 60.2, 150.55, 100.0])
    ys = np.array([55.8, 60.1, 140.45, 135.3, 100.0])
    flux = rng.uniform(5e3, 5e4, xs.size)
    img = draw_stars((200, 200), xs, ys, flux).astype(np.float32)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    out, out_var, out_mask = warp_image(img, var, mask, SRC, DST, (190, 190))
    ra, dec = SRC.wcs_pix2world(xs, ys, 0)
    tx, ty = DST.wcs_world2pix(ra, dec, 0)
    for x, y, f in zip(tx, ty, flux, strict=True):
        ix, iy = int(round(x)), int(round(y))
        cut = out[iy - 15 : iy + 16, ix - 15 : ix + 16].astype(float)
        yy, xx = np.mgrid[iy - 15 : iy + 16, ix - 15 : ix + 16]
        total = cut.sum()
        assert abs((cut * xx).sum() / total - x) < 0.01
        assert abs((cut * yy).sum() / total - y) < 0.01
        assert abs(total / f - 1.0) < 1e-3  # flux conserved through the 2% scale change
    assert not any_set(out_mask[20:170, 20:170], "NO_DATA").any()


def test_noise_variance_matches_propagated():
    rng = np.random.default_rng(11)
    shape = (220, 220)
    sigma_in = 3.0
    img = rng.normal(0.0, sigma_in, shape).astype(np.float32)
    var = np.full(shape, sigma_in**2, np.float32)
    out, out_var, out_mask = warp_image(img, var, np.zeros(shape, np.int32), SRC, DST, (190, 190))
    good = ~any_set(out_mask, "NO_DATA")
    measured = np.var(out[good])
    predicted = np.mean(out_var[good])
    # per-pixel variance is exact; J^2 = 1.02^4 scales it, Lanczos averaging reduces it
    assert abs(measured / predicted - 1.0) < 0.03
    assert 0.6 * sigma_in**2 < predicted < 1.1 * sigma_in**2 * 1.02**4
    # ...but neighbours are correlated (neglected covariance): aperture sums are noisier
    box = out[40:140, 40:140]
    sums = box.reshape(20, 5, 20, 5).sum(axis=(1, 3))
    assert np.var(sums) > 1.1 * 25 * predicted


def test_masks_and_no_data():
    shape = (200, 200)
    img = np.zeros(shape, np.float32)
    var = np.ones(shape, np.float32)
    mask = np.zeros(shape, np.int32)
    mask[100, 100] = bit("BAD")
    img[50, 150] = np.nan  # a non-finite source pixel becomes NO_DATA over the kernel footprint
    out, out_var, out_mask = warp_image(img, var, mask, SRC, DST, (230, 230))
    bad = any_set(out_mask, "BAD")
    assert 1 <= bad.sum() <= 4
    ra, dec = SRC.wcs_pix2world([100.0], [100.0], 0)
    x, y = DST.wcs_world2pix(ra, dec, 0)
    by, bx = np.nonzero(bad)
    assert np.all(np.hypot(bx - x[0], by - y[0]) < 1.5)
    no_data = any_set(out_mask, "NO_DATA")
    assert np.isnan(out[no_data]).all() and np.isinf(out_var[no_data]).all()
    assert np.isfinite(out[~no_data]).all()
    ra, dec = SRC.wcs_pix2world([150.0], [50.0], 0)
    x, y = DST.wcs_world2pix(ra, dec, 0)
    assert no_data[int(round(y[0])), int(round(x[0]))]
    # the destination is larger than the source: its outer ring has no coverage
    assert no_data[0, 0] and no_data[-1, -1] and no_data[:, -1].all()
    assert not no_data[115, 115]


def test_xy0_offsets_are_consistent():
    img = draw_stars((200, 200), [90.3], [110.2], [1e4]).astype(np.float32)
    var = np.ones_like(img)
    mask = np.zeros(img.shape, np.int32)
    full, _, _ = warp_image(img, var, mask, SRC, DST, (190, 190))
    sub, _, _ = warp_image(img[20:, 30:], var[20:, 30:], mask[20:, 30:], SRC, DST, (60, 70),
                           dst_xy0=(60, 80), src_xy0=(30, 20))
    np.testing.assert_allclose(sub, full[80:140, 60:130], rtol=1e-4, atol=1e-3)


def test_warp_psf_matches_warped_star():
    psf = PixelPsf.constant(draw_stars((31, 31), [15.0], [15.0], [1.0]))  # same profile as the star
    img = draw_stars((200, 200), [99.37], [101.81], [1e5]).astype(np.float32)
    out, _, _ = warp_image(img, np.ones_like(img), np.zeros(img.shape, np.int32), SRC, DST, (190, 190))
    ra, dec = SRC.wcs_pix2world([99.37], [101.81], 0)
    x, y = DST.wcs_world2pix(ra, dec, 0)
    ix, iy = int(round(x[0])), int(round(y[0]))
    cut = out[iy - 15 : iy + 16, ix - 15 : ix + 16].astype(float)
    star = PixelPsf.constant(cut)
    warped = warp_psf(psf, SRC, DST, (0, 0, 189, 189))
    # the source PSF sigma is 2 px (pixel-integrated: sqrt(4 + 1/12)); pixels 2% larger
    expected = np.sqrt(SIGMA**2 + 1 / 12) / 1.02
    assert warped.sigma() == pytest.approx(star.sigma(), rel=0.01)
    assert warped.sigma() == pytest.approx(expected, rel=0.02)
    assert warped.order == 0 and warped.kernel_size == 31
    warped1 = warp_psf(psf, SRC, DST, (0, 0, 189, 189), order=1)
    assert warped1.sigma(10, 10) == pytest.approx(warped.sigma(), rel=1e-3)


def test_bad_kernel_and_shapes_raise():
    a = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError, match="bicubic"):
        warp_image(a, a, a.astype(np.int32), SRC, DST, (10, 10), kernel="bicubic")
    with pytest.raises(ValueError, match="variance"):
        warp_image(a, a[:5], a.astype(np.int32), SRC, DST, (10, 10))


def test_aperture_correction_follows_the_sky():
    from diapipe.calibrate import ApertureCorrection
    from diapipe.coadd.warp import warp_aperture_correction

    src_wcs = make_wcs((100.0, 80.0), 0.2, 3.0)
    dst_wcs = make_wcs((500.0, 450.0), 0.204, 0.0)
    # a correction rising linearly across the calexp (2 % over its width)
    src = ApertureCorrection([1.02, 0.01, 0.0], 1, (0, 0, 199, 159), err=0.002)
    dst_bbox = (420, 390, 560, 510)
    warped = warp_aperture_correction(src, src_wcs, dst_wcs, dst_bbox)
    assert warped.bbox == tuple(float(b) for b in dst_bbox) and warped.err == 0.002
    x = np.array([425.0, 500.0, 555.0, 430.0])
    y = np.array([395.0, 450.0, 505.0, 500.0])
    ra, dec = dst_wcs.all_pix2world(x, y, 0)
    u, v = src_wcs.all_world2pix(ra, dec, 0)
    # the same correction at the same sky positions (a linear field stays linear)
    np.testing.assert_allclose(warped.evaluate(x, y), src.evaluate(u, v), atol=1e-9)
    # and a constant stays constant
    assert warp_aperture_correction(ApertureCorrection.constant(1.03, (0, 0, 199, 159)), src_wcs, dst_wcs,
                                    dst_bbox).evaluate(500.0, 450.0) == pytest.approx(1.03)
