"""Seeded factories shared by tests (one home for synthetic test objects)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import numpy as np
from astropy.wcs import WCS, Sip

from diapipe.exposure.exposure import Exposure, PhotoCalib, VisitInfo
from diapipe.exposure.psf import PixelPsf

__all__ = [
    "make_tan_sip_wcs",
    "make_test_exposure",
    "build_once",
    "SIM_SEED",
    "TEMPLATE_COLLECTION",
    "TEMPLATE_WHERE",
    "TEMPLATE_ALL_COLLECTION",
]

#: seed of the session's shared simulated repository (the CLI's default)
SIM_SEED = 1
#: ApTemplate output of the session's shared run (tests/conftest.py ``template_repo``)
TEMPLATE_COLLECTION = "u/test/templates"
#: the test preset's template-epoch visits end in January 2023, its science visits start in November:
#: templates from that season only, so that no science visit is inside its own template
TEMPLATE_WHERE = "skymap='DC2' AND tract=3828 AND patch=24 AND band='g' AND day_obs < 20230601"
#: ApTemplate over every visit, as the guide runs it (science visits with transients inside)
TEMPLATE_ALL_COLLECTION = "u/test/templates_all"


def make_tan_sip_wcs(ra=61.86, dec=-35.8, crpix=(100.5, 80.25), rotation_deg=12.0, scale_arcsec=0.2, sip=True):
    """A TAN(-SIP) WCS at 0.2"/px with a rotation and a small radial-ish distortion."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = list(crpix)
    theta = np.deg2rad(rotation_deg)
    p = scale_arcsec / 3600.0
    wcs.wcs.cd = p * np.array([[-np.cos(theta), np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    if sip:
        a = np.zeros((4, 4))
        b = np.zeros((4, 4))
        a[2, 0], a[0, 2], a[3, 0], a[1, 2] = 2.1e-7, 2.1e-7, 1.3e-11, 1.3e-11
        b[0, 2], b[2, 0], b[0, 3], b[2, 1] = 2.1e-7, 2.1e-7, 1.3e-11, 1.3e-11
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    wcs.wcs.set()
    return wcs


def make_test_exposure(seed=1, shape=(60, 80), xy0=(1000, 2000), with_everything=True) -> Exposure:
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, shape).astype(np.float32)
    image[5, 7] = np.nan
    mask = rng.integers(0, 2**11, shape).astype(np.int32)
    variance = rng.uniform(90, 110, shape).astype(np.float32)
    if not with_everything:
        return Exposure(image, mask, variance, xy0=xy0)
    basis = rng.normal(0, 0.01, (3, 15, 15))
    basis[0] += PixelPsf.gaussian(2.0, 15).basis[0]
    psf = PixelPsf(basis, 1, (xy0[0], xy0[1], xy0[0] + shape[1] - 1, xy0[1] + shape[0] - 1))
    visit_info = VisitInfo(
        instrument="LSSTCam-imSim",
        exposure=960220,
        visit=960220,
        detector=33,
        physical_filter="g_sim_1.4",
        band="g",
        exposure_time_s=30.0,
        dark_time_s=30.0,
        mjd_tai=60123.123456789,
        boresight_ra_deg=61.9,
        boresight_dec_deg=-35.8,
        rot_sky_pos_deg=123.456,
        airmass=1.2345,
    )
    return Exposure(
        image=image,
        mask=mask,
        variance=variance,
        wcs=make_tan_sip_wcs(crpix=(xy0[0] + 40.3, xy0[1] + 30.7)),
        psf=psf,
        photo_calib=PhotoCalib(1.23456789e-2, 1.1e-5),
        visit_info=visit_info,
        metadata={"SKYLEVEL": 1234.5, "notes": ["a", "b"], "nested": {"k": 1}},
        xy0=xy0,
    )


def _shared_dir(tmp_path_factory) -> Path:
    # the parent of the per-worker base temp is common to all xdist workers
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root


def build_once(tmp_path_factory, name, build):
    """Run ``build(path)`` once per test session (across workers); return path."""
    from filelock import FileLock

    root = _shared_dir(tmp_path_factory)
    path = root / name
    done = root / f"{name}.done"
    failed = root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"building shared fixture {name} failed earlier in this session: {failed.read_text()}")
        if not done.exists():
            try:
                build(path)
            except BaseException as err:
                failed.write_text(repr(err))
                raise
            done.write_text("ok")
    return path
