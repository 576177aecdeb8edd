"""End-to-end Alard–Lupton subtraction on a synthetic 512x512 pair with known truth.

Template: stars with a Gaussian PSF, sigma 1.6 px. Science: the same stars 3% brighter,
PSF sigma 2.2 ± 0.2 px varying linearly across the image (a spatially varying PSF
mismatch), a quadratic background, 60 injected transients (S/N 15–60), Poisson-like
noise with the true variance planes.
"""

import numpy as np
import pytest
from astropy.table import Table

from diapipe.diffim.kernel_fit import TooFewKernelSourcesError
from diapipe.diffim.subtract import choose_convolve_template, subtract_images, variance_rescale_factor
from diapipe.exposure import masks
from diapipe.exposure.psf import PixelPsf


def gauss_kernel(sigma, size):
    h = size // 2
    y, x = np.mgrid[-h:h+1, -h:h+1]
    k = np.exp(-0.5 * (x**2 + y**2) / sigma**2)
    return k / k.sum()

def render(shape, xs, ys, fluxes, sigmas, half=15):
    img = np.zeros(shape)
    ny, nx = shape
    for x, y, f, s in zip(xs, ys, fluxes, sigmas):
        x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, nx)
        y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, ny)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += f * np.exp(-0.5 * ((xx - x)**2 + (yy - y)**2) / s**2) / (2 * np.pi * s**2)
    return img

def make_pair(seed=1, n=512, n_stars=250, n_transients=20, scale=1.03, sigma_t=1.6, sigma_s=2.2,
              dsigma=0.2, sky_var_s=100.0, sky_var_t=25.0, transient_sn=(15, 60)):
    rng = np.random.default_rng(seed)
    shape = (n, n)
    bbox = (0.0, 0.0, n - 1.0, n - 1.0)
    def sig_s(x):
        u = (2 * np.asarray(x) - (n - 1)) / (n - 1)
        return sigma_s + dsigma * u
    xs = rng.uniform(10, n - 10, n_stars); ys = rng.uniform(10, n - 10, n_stars)
    # S/N ~ flux / sqrt(4 pi sigma^2 var)
    noise_area = np.sqrt(4 * np.pi * sigma_s**2 * sky_var_s)
    fluxes = noise_area * 10 ** rng.uniform(np.log10(5), np.log10(1500), n_stars)
    # transients away from stars
    tx, ty = [], []
    while len(tx) < n_transients:
        x, y = rng.uniform(40, n - 40, 2)
        if np.min(np.hypot(xs - x, ys - y)) > 12 and all(np.hypot(np.array(tx) - x, np.array(ty) - y) > 12):
            tx.append(x); ty.append(y)
    tx = np.array(tx); ty = np.array(ty)
    tflux = noise_area * rng.uniform(*transient_sn, n_transients) * 0.9
    yy, xx = np.mgrid[0:n, 0:n]
    u = (2 * xx - (n - 1)) / (n - 1); v = (2 * yy - (n - 1)) / (n - 1)
    bg = 20.0 + 6.0 * u - 4.0 * v + 3.0 * u * v + 2.0 * u**2
    t_model = render(shape, xs, ys, fluxes, np.full(n_stars, sigma_t))
    s_model = render(shape, xs, ys, fluxes * scale, sig_s(xs)) + render(shape, tx, ty, tflux, sig_s(tx)) + bg
    t_var = sky_var_t + np.maximum(t_model, 0) * 0.25
    s_var = sky_var_s + np.maximum(s_model - bg, 0)
    template = t_model + rng.normal(size=shape) * np.sqrt(t_var)
    science = s_model + rng.normal(size=shape) * np.sqrt(s_var)
    t_psf = PixelPsf.gaussian(sigma_t, size=25, bbox=bbox)
    basis = np.array([gauss_kernel(sigma_s, 25),
                      0.5 * (gauss_kernel(sigma_s + dsigma, 25) - gauss_kernel(sigma_s - dsigma, 25)),
                      np.zeros((25, 25))])
    s_psf = PixelPsf(basis, 1, bbox)
    all_x = np.concatenate([xs, tx]); all_y = np.concatenate([ys, ty])
    all_f = np.concatenate([fluxes * scale, tflux])
    err = np.sqrt(4 * np.pi * sig_s(all_x)**2 * sky_var_s + all_f)
    sources = Table({"x": all_x, "y": all_y, "psfFlux": all_f, "psfFluxErr": err,
                     "flags": np.zeros(len(all_x), bool)})
    zero = np.zeros(shape, np.int32)
    return dict(science=science, science_var=s_var, science_mask=zero.copy(), science_psf=s_psf,
                template=template, template_var=t_var, template_mask=zero.copy(), template_psf=t_psf,
                sources=sources, stars=(xs, ys, fluxes), transients=(tx, ty, tflux), scale=scale, bg=bg)


def _run(d, **kwargs):
    return subtract_images(
        d["science"], d["science_var"], d["science_mask"], d["science_psf"],
        d["template"], d["template_var"], d["template_mask"], d["template_psf"], d["sources"], **kwargs,
    )


def _psf_fluxes(result, xs, ys):
    """Local weighted PSF fit at known positions (diapipe.measure had no PSF photometry yet)."""
    fluxes, errors = [], []
    for x, y in zip(xs, ys):
        p = result.difference_psf.compute_image(x, y)
        h = p.shape[0] // 2
        xi, yi = int(round(x)), int(round(y))
        d = result.difference_image[yi - h : yi + h + 1, xi - h : xi + h + 1]
        v = result.difference_variance[yi - h : yi + h + 1, xi - h : xi + h + 1]
        w = p / v
        fluxes.append((w * d).sum() / (w * p).sum())
        errors.append(1.0 / np.sqrt((p * p / v).sum()))
    return np.array(fluxes), np.array(errors)


def _near(shape, xs, ys, radius):
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    out = np.zeros(shape, bool)
    for x, y in zip(xs, ys):
        x0, y0 = int(x), int(y)
        sl = (slice(max(y0 - radius - 1, 0), y0 + radius + 2), slice(max(x0 - radius - 1, 0), x0 + radius + 2))
        out[sl] |= np.hypot(xx[sl] - x, yy[sl] - y) < radius
    return out


@pytest.fixture(scope="module")
def pair():
    return make_pair(seed=3, n_transients=60)


@pytest.fixture(scope="module")
def result(pair):
    return _run(pair, mode="auto")


def test_auto_mode_and_metadata(result):
    meta = result.metadata
    assert meta["mode"] == "convolveTemplate"
    assert meta["kernel_size"] == 21
    assert meta["n_stamps_used"] >= 50
    assert meta["n_stamps_rejected"] >= 1  # at least the transients among the candidates
    assert meta["n_stamps_used"] + meta["n_stamps_rejected"] == meta["n_kernel_candidates"]
    assert 0.95 < meta["science_variance_scale"] < 1.05
    assert 0.95 < meta["template_variance_scale"] < 1.05


def test_photometric_scale(result, pair):
    assert result.metadata["scale_factor"] == pytest.approx(pair["scale"], rel=1e-3)


def test_noise_on_blank_sky_and_at_stars(result, pair):
    good = ~masks.any_set(result.difference_mask, "NO_DATA")
    xs, ys, fluxes = pair["stars"]
    tx, ty, _ = pair["transients"]
    z = result.difference_image / np.sqrt(result.difference_variance)
    blank = good & ~_near(z.shape, np.r_[xs, tx], np.r_[ys, ty], 10)
    assert np.std(z[blank]) == pytest.approx(1.0, abs=0.05)
    assert abs(np.mean(z[blank])) < 0.02
    bright = fluxes > np.percentile(fluxes, 80)
    annuli = good & _near(z.shape, xs[bright], ys[bright], 8)
    assert np.std(z[annuli]) < 1.1


def test_transients_recovered(result, pair):
    tx, ty, tflux = pair["transients"]
    flux, err = _psf_fluxes(result, tx, ty)
    assert np.median(flux / tflux) == pytest.approx(1.0, abs=0.02)
    pulls = (flux - tflux) / err
    assert np.std(pulls) == pytest.approx(1.0, abs=0.15)
    assert abs(np.median(pulls)) < 0.3


def test_convolve_science_when_template_is_wider():
    # swap the roles: the "science" now has the narrow PSF -> auto must convolve the science
    d = make_pair(seed=2, n_transients=10, sigma_t=2.2, sigma_s=1.6, dsigma=0.0, scale=0.97)
    assert not choose_convolve_template(d["science_psf"], d["template_psf"])
    res = _run(d, mode="auto")
    assert res.metadata["mode"] == "convolveScience"
    assert res.metadata["scale_factor"] == pytest.approx(0.97, rel=2e-3)
    good = ~masks.any_set(res.difference_mask, "NO_DATA")
    xs, ys, _ = d["stars"]
    tx, ty, tflux = d["transients"]
    z = res.difference_image / np.sqrt(res.difference_variance)
    blank = good & ~_near(z.shape, np.r_[xs, tx], np.r_[ys, ty], 10)
    assert np.std(z[blank]) == pytest.approx(1.0, abs=0.05)
    flux, _ = _psf_fluxes(res, tx, ty)
    assert np.median(flux / tflux) == pytest.approx(1.0, abs=0.03)


def test_convolve_science_recovers_transient_fluxes():
    # science PSF narrower (1.6 vs 2.4 px): the science is convolved; the difference must
    # be on the science flux scale (divided by the kernel sum) with correct errors
    d = make_pair(seed=3, n_transients=40, sigma_t=2.4, sigma_s=1.6, dsigma=0.0, scale=0.97)
    res = _run(d, mode="convolveScience")
    assert res.metadata["scale_factor"] == pytest.approx(0.97, rel=5e-3)
    tx, ty, tflux = d["transients"]
    flux, err = _psf_fluxes(res, tx, ty)
    assert np.median(flux / tflux) == pytest.approx(1.0, abs=0.02)
    pulls = (flux - tflux) / err
    assert np.std(pulls) == pytest.approx(1.0, abs=0.2)
    assert abs(np.median(pulls)) < 0.5


def test_nan_region_is_masked_not_propagated(pair):
    d = dict(pair)
    template = d["template"].copy()
    template[200:240, 300:330] = np.nan
    d["template"] = template
    res = _run(d, mode="convolveTemplate")
    no_data = masks.any_set(res.difference_mask, "NO_DATA")
    assert no_data[200:240, 300:330].all()
    assert no_data[195:245, 295:335].all()  # grown by the kernel footprint
    assert np.isfinite(res.difference_image[~no_data]).all()
    assert np.isfinite(res.difference_variance[~no_data]).all()
    assert np.isnan(res.difference_image[no_data]).all()
    assert no_data.mean() < 0.2
    # the rest of the image is still a good subtraction
    z = res.difference_image / np.sqrt(res.difference_variance)
    xs, ys, _ = d["stars"]
    tx, ty, _ = d["transients"]
    blank = ~no_data & ~_near(z.shape, np.r_[xs, tx], np.r_[ys, ty], 10)
    assert np.std(z[blank]) == pytest.approx(1.0, abs=0.05)


def test_float32_inputs_are_read_not_written(pair, result):
    """Inputs already float32/int32 are used without copies (`_clean(copy=False)`): never modified."""
    d = dict(pair)
    for key in ("science", "science_var", "template", "template_var"):
        d[key] = pair[key].astype(np.float32)
    d["science_mask"] = pair["science_mask"].copy()
    d["template_mask"] = pair["template_mask"].copy()
    keys = ("science", "science_var", "science_mask", "template", "template_var", "template_mask")
    before = {k: d[k].copy() for k in keys}
    same = _run(d, mode="auto")
    # float64 -> float32 happens either way: the subtraction is bit-identical
    np.testing.assert_array_equal(same.difference_image, result.difference_image)
    np.testing.assert_array_equal(same.difference_mask, result.difference_mask)
    for key in keys:
        np.testing.assert_array_equal(d[key], before[key], err_msg=f"convolveTemplate wrote into {key}")
    # the science image now needs filling (copied); the template planes are used as they are
    d["science"][300, 300] = np.nan
    d["template_mask"][50:52, 60:90] |= masks.bit("BAD")
    before = {k: d[k].copy() for k in keys}
    res = _run(d, mode="convolveScience", max_median_chi2=np.inf)  # (a deconvolution here)
    assert masks.any_set(res.difference_mask, "NO_DATA")[300, 300]
    for key in keys:
        np.testing.assert_array_equal(d[key], before[key], err_msg=f"convolveScience wrote into {key}")


def test_template_saturation_becomes_sat_template(pair):
    d = dict(pair)
    tmask = d["template_mask"].copy()
    tmask[100, 100] |= masks.bit("SAT")
    d["template_mask"] = tmask
    res = _run(d, mode="convolveTemplate")
    sat_t = masks.any_set(res.difference_mask, "SAT_TEMPLATE")
    assert sat_t[100, 100] and sat_t[100, 110] and not sat_t[100, 112]
    assert not masks.any_set(res.difference_mask, "SAT").any()


def test_too_few_sources_raises_with_counts(pair):
    d = dict(pair)
    d["sources"] = pair["sources"][:2]
    with pytest.raises(TooFewKernelSourcesError) as info:
        _run(d)
    assert info.value.n_found <= 2 and info.value.n_needed == 3


def test_unknown_mode_and_shape_mismatch(pair):
    with pytest.raises(ValueError, match="mode"):
        _run(pair, mode="zogy")
    d = dict(pair)
    d["template"] = pair["template"][:-1]
    with pytest.raises(ValueError, match="template"):
        _run(d)


def test_variance_rescale_factor_measures_noise():
    rng = np.random.default_rng(5)
    img = rng.normal(0.0, 3.0, (300, 300)) + 50.0
    img[100:110, 100:110] += 500.0  # a "source" that must not inflate the estimate
    factor = variance_rescale_factor(img, np.full(img.shape, 4.0), np.zeros(img.shape, np.int32))
    assert factor == pytest.approx(9.0 / 4.0, rel=0.03)


def test_blank_position_psf_flux_sn_width(result, pair):
    rng = np.random.default_rng(11)
    xs, ys, _ = pair["stars"]
    tx, ty, _ = pair["transients"]
    px, py = [], []
    while len(px) < 300:
        x, y = rng.uniform(30, 482, 2)
        if np.min(np.hypot(np.r_[xs, tx] - x, np.r_[ys, ty] - y)) > 12:
            px.append(x)
            py.append(y)
    flux, err = _psf_fluxes(result, px, py)
    assert np.std(flux / err) == pytest.approx(1.0, abs=0.1)
