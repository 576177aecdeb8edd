"""Kernel source selection and the spatially varying kernel fit on synthetic stars."""

import numpy as np
import pytest
from astropy.table import Table

from diapipe.diffim.basis import basis_for_psfs
from diapipe.diffim.kernel_fit import (
    BadPsfMatchError,
    TooFewKernelSourcesError,
    fit_psf_matching_kernel,
    kernel_sum_outliers,
    select_kernel_sources,
)
from diapipe.exposure import masks

N = 384


def _stars(shape, xs, ys, fluxes, sigma):
    img = np.zeros(shape)
    for x, y, f in zip(xs, ys, fluxes):
        x0, y0 = int(x) - 15, int(y) - 15
        yy, xx = np.mgrid[max(y0, 0) : min(y0 + 31, shape[0]), max(x0, 0) : min(x0 + 31, shape[1])]
        img[yy, xx] += f * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2) / (2 * np.pi * sigma**2)
    return img


def _pair(seed=0, scale=1.05, misregister_pix=0.0):
    """Template sigma 1.6, science = template * Gaussian(1.5) * scale + linear background."""
    rng = np.random.default_rng(seed)
    n_stars = 120
    xs, ys = rng.uniform(30, N - 30, n_stars), rng.uniform(30, N - 30, n_stars)
    fluxes = 10 ** rng.uniform(3.2, 4.8, n_stars)
    sigma_s = np.hypot(1.6, 1.5)
    jitter = rng.normal(0.0, misregister_pix, (2, n_stars))
    template = _stars((N, N), xs, ys, fluxes, 1.6)
    yy, xx = np.mgrid[0:N, 0:N]
    bg = 5.0 + 0.01 * xx - 0.005 * yy
    science = _stars((N, N), xs + jitter[0], ys + jitter[1], scale * fluxes, sigma_s) + bg
    t_var = np.full((N, N), 4.0) + 0.1 * template
    s_var = np.full((N, N), 25.0) + science - bg
    template += rng.normal(size=(N, N)) * np.sqrt(t_var)
    science += rng.normal(size=(N, N)) * np.sqrt(s_var)
    return template, t_var, science, s_var, xs, ys, fluxes, bg


def _catalog(xs, ys, fluxes, sn=None, flags=None):
    sn = np.full(len(xs), 50.0) if sn is None else np.asarray(sn, float)
    return Table({
        "x": xs, "y": ys, "psfFlux": np.asarray(fluxes, float), "psfFluxErr": np.asarray(fluxes, float) / sn,
        "flags": np.zeros(len(xs), bool) if flags is None else flags,
    })


def test_constant_kernel_recovered():
    template, t_var, science, s_var, xs, ys, fluxes, bg = _pair()
    basis = basis_for_psfs(1.6, np.hypot(1.6, 1.5))
    # as subtract_images does: fit box = kernel half width + 2 sigma, neighbours masked
    chosen = select_kernel_sources(_catalog(xs, ys, fluxes), np.zeros((N, N), np.int32), 25, isolation_radius_pix=10)
    result = fit_psf_matching_kernel(
        template, t_var, science, s_var, xs[chosen], ys[chosen], basis, fit_half_size=15,
        neighbour_xy=np.column_stack([xs, ys]), neighbour_radius_pix=6.6,
    )
    sol = result.solution
    # measured scatter of the fitted scale over noise realisations is ~0.1% here
    # (this seed: +0.19%); the 0.1% requirement is asserted end to end in test_subtract
    assert sol.kernel_sum() == pytest.approx(1.05, abs=2.5e-3)
    # the kernel everywhere matches the true Gaussian (sigma 1.5, sum 1.05) as seen through
    # the template PSF (the kernel's own high frequencies are unconstrained: the template
    # has no power there, so only kernel * PSF_template is testable)
    from scipy.signal import fftconvolve

    half = basis.size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    truth = np.exp(-0.5 * (x**2 + y**2) / 1.5**2)
    truth *= 1.05 / truth.sum()
    psf_t = np.exp(-0.5 * (x**2 + y**2) / 1.6**2)
    psf_t /= psf_t.sum()
    matched_truth = fftconvolve(truth, psf_t)
    for px, py in [(50, 50), (192, 192), (330, 60)]:
        matched = fftconvolve(sol.kernel_image(px, py), psf_t)
        assert np.abs(matched - matched_truth).max() < 0.02 * matched_truth.max()
        assert sol.kernel_sum(px, py) == pytest.approx(1.05, abs=2.5e-3)
    # the differential background is recovered to a small fraction of the noise (sigma 5)
    model = sol.background_image((N, N))
    assert np.abs(model - bg)[30:-30, 30:-30].max() < 0.5
    assert 0.8 < result.median_chi2 < 1.25
    assert result.n_used >= 0.85 * len(chosen)


def test_bad_registration_raises_bad_match():
    template, t_var, science, s_var, xs, ys, *_ = _pair(misregister_pix=1.0)
    basis = basis_for_psfs(1.6, np.hypot(1.6, 1.5))
    with pytest.raises(BadPsfMatchError) as info:
        fit_psf_matching_kernel(template, t_var, science, s_var, xs, ys, basis)
    assert info.value.chi2_per_dof > info.value.threshold


def test_selection_cuts():
    shape = (200, 200)
    mask = np.zeros(shape, np.int32)
    xs = np.array([50.0, 100.0, 150.0, 100.0, 104.0, 150.0, 5.0, 60.0])
    ys = np.array([50.0, 50.0, 50.0, 120.0, 121.0, 150.0, 100.0, 150.0])
    sn = np.array([50, 9, 600, 50, 50, 50, 50, 40])
    flags = np.zeros(len(xs), bool)
    flags[7] = True
    mask[148, 152] |= masks.bit("SAT")  # kills source 5
    cat = _catalog(xs, ys, np.full(len(xs), 1000.0), sn=sn, flags=flags)
    chosen = select_kernel_sources(cat, mask, 10, min_sources=1)
    # 1: S/N < 10, 2: S/N > 500, 3+4: not isolated, 5: masked pixel, 6: off the edge, 7: flagged
    assert list(chosen) == [0]


def test_selection_sorts_by_sn_and_caps():
    rng = np.random.default_rng(1)
    xs = np.arange(20) * 40.0 + 30
    cat = _catalog(xs, np.full(20, 50.0), np.full(20, 1.0), sn=rng.uniform(10, 400, 20))
    chosen = select_kernel_sources(cat, np.zeros((100, 860), np.int32), 10, max_sources=5)
    sn = np.asarray(cat["psfFlux"] / cat["psfFluxErr"])
    assert list(chosen) == list(np.argsort(-sn)[:5])


def test_too_few_sources_error_has_counts():
    cat = _catalog(np.array([50.0, 120.0]), np.array([50.0, 50.0]), np.array([1.0, 1.0]))
    with pytest.raises(TooFewKernelSourcesError) as info:
        select_kernel_sources(cat, np.zeros((200, 200), np.int32), 10)
    assert (info.value.n_found, info.value.n_needed) == (2, 3)
    assert "found 2, need 3" in str(info.value)


def test_bright_variable_stamps_rejected_bright_stars_kept():
    """Two bright variable stars (science flux x1.2 and x0.8) and two bright constant stars
    among faint kernel sources. Each stamp's kernel sum is judged against its own error,
    so the variables go and the constant stars, which define the kernel, stay. The old
    clip (population robust sigma around the plain median, which the faint stamps set)
    kept the variables; they bent the spatial fit, which then rejected both constant
    stars: kernel sum 1.137 for 1.05 (test preset visit 1560714: score residuals of 4 %
    of a star's significance)."""
    rng = np.random.default_rng(6)
    n_stars = 80
    xs, ys = rng.uniform(30, N - 30, n_stars), rng.uniform(30, N - 30, n_stars)
    fluxes = 10 ** rng.uniform(2.6, 3.3, n_stars)  # mostly faint stamps (S/N 10-40)
    fluxes[:4] = 3e5
    change = np.ones(n_stars)
    change[2], change[3] = 1.2, 0.8  # 0 and 1 are constant
    sigma_s = np.hypot(1.6, 1.5)
    template = _stars((N, N), xs, ys, fluxes, 1.6)
    science = _stars((N, N), xs, ys, 1.05 * fluxes * change, sigma_s)
    t_var = np.full((N, N), 4.0) + 0.1 * template
    s_var = np.full((N, N), 25.0) + science
    template += rng.normal(size=(N, N)) * np.sqrt(t_var)
    science += rng.normal(size=(N, N)) * np.sqrt(s_var)
    basis = basis_for_psfs(1.6, sigma_s)
    result = fit_psf_matching_kernel(template, t_var, science, s_var, xs, ys, basis, fit_half_size=15,
                                     spatial_order=1, background_order=0)
    assert result.used[:2].all()
    assert not result.used[2:4].any()
    assert result.solution.kernel_sum() == pytest.approx(1.05, abs=5e-3)


def test_kernel_sum_outliers_weighted_centre():
    sums = np.array([1.0, 1.001, 0.999, 1.5, 1.6, 1.4, 1.3, 1.22])
    errs = np.array([0.003, 0.003, 0.003, 0.3, 0.3, 0.3, 0.3, 0.005])
    out = kernel_sum_outliers(sums, errs, np.ones(len(sums), bool), 3.0, 0.01)
    # the precise stamps set the centre (1.0), not the faint majority; the precise 1.22 is out
    assert out.tolist() == [False, False, False, False, False, False, False, True]

