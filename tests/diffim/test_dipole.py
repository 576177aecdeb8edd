"""Dipole pairing and fitting on synthetic difference images."""

import numpy as np
import pytest

from diapipe.diffim.dipole import fit_dipole, measure_dipoles, pair_dipoles
from diapipe.exposure.psf import PixelPsf

PSF = PixelPsf.gaussian(2.0, 21)


def _add(img, x, y, flux):
    stamp = PSF.compute_image(x, y)
    xi, yi = int(round(x)), int(round(y))
    img[yi - 10 : yi + 11, xi - 10 : xi + 11] += flux * stamp


def test_pairing_is_greedy_nearest_and_limited():
    pos = [(10, 10), (20, 10), (60, 60)]
    neg = [(13, 10), (19, 12), (70, 60)]
    assert sorted(pair_dipoles(pos, neg, 5.0)) == [(0, 0), (1, 1)]
    assert pair_dipoles([], neg) == []


def test_dipole_fit_recovers_flux_separation_orientation():
    results = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        img = rng.normal(size=(100, 100))
        angle = rng.uniform(-np.pi, np.pi)
        xp, yp = 50.3 + 2 * np.cos(angle), 40.2 + 2 * np.sin(angle)
        xn, yn = 50.3 - 2 * np.cos(angle), 40.2 - 2 * np.sin(angle)
        _add(img, xp, yp, 300.0)
        _add(img, xn, yn, -300.0)
        fit = fit_dipole(img, np.ones_like(img), PSF, (xp + 0.5, yp - 0.4), (xn - 0.3, yn + 0.5))
        dangle = (fit.orientation_deg - np.degrees(angle) + 180) % 360 - 180
        results.append((fit.flux, fit.separation_pix, dangle, fit.chi2 / fit.dof, fit.is_dipole))
    res = np.array(results, float)
    assert np.median(res[:, 0]) == pytest.approx(300.0, rel=0.05)
    assert np.median(res[:, 1]) == pytest.approx(4.0, abs=0.2)
    assert np.abs(res[:, 2]).max() < 5.0
    assert np.median(res[:, 3]) == pytest.approx(1.0, abs=0.1)
    assert res[:, 4].all()


def test_isolated_point_source_is_not_a_dipole():
    rng = np.random.default_rng(7)
    img = rng.normal(size=(80, 80))
    _add(img, 40.0, 40.0, 400.0)
    table = measure_dipoles(img, np.ones_like(img), PSF, [(40, 40)], [(43, 41)], equal_flux=False)
    assert len(table) == 1
    assert not table["isDipole"][0]
    assert table["sn_pos"][0] > 20 and table["sn_neg"][0] < 5 / np.sqrt(2)
    empty = measure_dipoles(img, np.ones_like(img), PSF, [(40, 40)], [(70, 70)])
    assert len(empty) == 0 and "isDipole" in empty.colnames
