"""Visits and observing conditions at Cerro Pachón: time, pointing, airmass, seeing, sky, zero point.

All numbers per band come from SMTN-002 (LSST throughputs; see
shared/SIM_REFERENCE.md): dark-sky brightness, the zero point ``zp`` (AB mag that
gives 1 e⁻/s), the extinction coefficient ``k`` and the FWHM relations

.. math::

    \\mathrm{FWHM_{atm}} = s_{500}\\, X^{0.6} (500\\,\\mathrm{nm}/\\lambda_{eff})^{0.3},\\quad
    \\mathrm{FWHM_{sys}} = 0.40''\\,X^{0.6},

    \\mathrm{FWHM_{eff}} = 1.16 \\sqrt{\\mathrm{FWHM_{sys}}^2 + 1.04\\,\\mathrm{FWHM_{atm}}^2},\\quad
    \\mathrm{FWHM_{geom}} = 0.822\\,\\mathrm{FWHM_{eff}} + 0.052''.

The delivered PSF is drawn with FWHM = FWHM_geom (the profile's true FWHM) at
the boresight, growing by a few per cent towards the edge of the focal plane
(`psf_fwhm_at`), with a small ellipticity (`psf_ellipticity_at`).

Calibration: ``zp_1e_per_s = zp − k (X − 1) − cloud_mag``; an object of AB mag
``m`` gives ``t · 10^(−0.4 (m − zp_1e_per_s))`` electrons in ``t`` seconds, so
``njy_to_electrons(visit) = t · 10^(0.4 (zp_1e_per_s − 31.4))``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

__all__ = [
    "BAND_PARAMS",
    "CERRO_PACHON_LAT_DEG",
    "CERRO_PACHON_LON_DEG",
    "FOCAL_PLANE_RADIUS_MM",
    "Visit",
    "airmass_from_altitude",
    "fwhm_eff_arcsec",
    "fwhm_geom_arcsec",
    "m5_point_source",
    "make_visits",
    "njy_to_electrons",
    "psf_ellipticity_at",
    "psf_fwhm_at",
    "sky_e_per_px",
    "visits_table",
]

CERRO_PACHON_LAT_DEG = -30.2444
CERRO_PACHON_LON_DEG = -70.7494
FOCAL_PLANE_RADIUS_MM = 320.0  # ~1.75 deg field radius at 20.006"/mm
DC2_START_MJD = 59580.0

# band: (dark sky mag/arcsec², zp 1 e-/s, FWHMeff zenith ("), k, m5 30 s, lambda_eff nm)
BAND_PARAMS = {
    "u": {"sky_mag": 23.05, "zp": 26.52, "fwhm_eff_zenith": 0.92, "k": 0.470, "m5": 23.70, "lam_nm": 366.0},
    "g": {"sky_mag": 22.25, "zp": 28.51, "fwhm_eff_zenith": 0.87, "k": 0.213, "m5": 24.97, "lam_nm": 482.0},
    "r": {"sky_mag": 21.20, "zp": 28.36, "fwhm_eff_zenith": 0.83, "k": 0.126, "m5": 24.52, "lam_nm": 622.0},
    "i": {"sky_mag": 20.46, "zp": 28.17, "fwhm_eff_zenith": 0.80, "k": 0.096, "m5": 24.13, "lam_nm": 754.0},
    "z": {"sky_mag": 19.61, "zp": 27.78, "fwhm_eff_zenith": 0.78, "k": 0.068, "m5": 23.56, "lam_nm": 869.0},
    "y": {"sky_mag": 18.60, "zp": 26.82, "fwhm_eff_zenith": 0.76, "k": 0.171, "m5": 22.55, "lam_nm": 971.0},
}
# Sky brightening at full moon (mag), roughly: strong in the blue, weak in the red.
_MOON_BRIGHTENING = {"u": 2.5, "g": 1.8, "r": 1.0, "i": 0.7, "z": 0.4, "y": 0.3}
_NEW_MOON_MJD = 59581.77  # 2022-01-02
_SYNODIC_DAYS = 29.530589


@dataclass(frozen=True)
class Visit:
    """One 30 s exposure and the conditions it was taken in.

    ``psf_fwhm_arcsec`` is the true FWHM of the drawn PSF at the boresight
    (= FWHM_geom); ``fwhm_eff_arcsec`` the noise-equivalent FWHM of SMTN-002.
    ``zp_1e_per_s`` includes extinction and clouds. ``psf_*`` shape parameters
    drive `psf_fwhm_at` / `psf_ellipticity_at`.
    """

    visit: int
    band: str
    physical_filter: str
    mjd: float
    exposure_time_s: float
    boresight_ra: float
    boresight_dec: float
    rot_sky_pos_deg: float
    hour_angle_deg: float
    altitude_deg: float
    airmass: float
    seeing_500nm_arcsec: float
    fwhm_eff_arcsec: float
    psf_fwhm_arcsec: float
    sky_mag_arcsec2: float
    cloud_mag: float
    zp_1e_per_s: float
    m5: float
    psf_radial_growth: float
    psf_e1: float
    psf_e2: float
    psf_e_radial: float

    @property
    def zp_exposure(self) -> float:
        """AB mag that gives 1 electron in the whole exposure."""
        return self.zp_1e_per_s + 2.5 * np.log10(self.exposure_time_s)


def airmass_from_altitude(alt_deg):
    """Kasten & Young (1989) airmass; 1 at zenith."""
    alt = np.asarray(alt_deg, dtype=float)
    return 1.0 / (np.sin(np.radians(alt)) + 0.50572 * (alt + 6.07995) ** -1.6364)


def fwhm_eff_arcsec(band: str, seeing_500nm_arcsec, airmass):
    """SMTN-002 FWHMeff (") for an atmospheric FWHM at 500 nm and zenith."""
    lam = BAND_PARAMS[band]["lam_nm"]
    x06 = np.asarray(airmass, float) ** 0.6
    atm = np.asarray(seeing_500nm_arcsec, float) * x06 * (500.0 / lam) ** 0.3
    sys = 0.40 * x06
    return 1.16 * np.sqrt(sys**2 + 1.04 * atm**2)


def fwhm_geom_arcsec(band: str, seeing_500nm_arcsec, airmass):
    """SMTN-002 FWHMgeom = 0.822 FWHMeff + 0.052 (") — the PSF's true FWHM."""
    return 0.822 * fwhm_eff_arcsec(band, seeing_500nm_arcsec, airmass) + 0.052


def njy_to_electrons(visit: Visit) -> float:
    """Electrons per nJy of source flux in this visit: ``t · 10^(0.4 (zp − 31.4))``."""
    return float(visit.exposure_time_s * 10.0 ** (0.4 * (visit.zp_1e_per_s - 31.4)))


def sky_e_per_px(visit: Visit, pixel_area_arcsec2: float = 0.04) -> float:
    """Sky electrons per pixel in the exposure (throughput of the clear zenith zp)."""
    zp0 = BAND_PARAMS[visit.band]["zp"]
    return float(visit.exposure_time_s * pixel_area_arcsec2 * 10.0 ** (-0.4 * (visit.sky_mag_arcsec2 - zp0)))


def m5_point_source(
    band: str,
    *,
    fwhm_eff: float | None = None,
    sky_mag: float | None = None,
    zp_1e_per_s: float | None = None,
    exposure_time_s: float = 30.0,
    pixel_scale_arcsec: float = 0.2,
    read_noise_e: float = 4.9,
    n_snaps: int = 1,
    dark_e_per_s: float = 0.02,
) -> float:
    """5σ point-source depth (AB mag) from the counts, with n_eff = 2.266 (FWHMeff/pix)².

    Defaults are our detector (one 30 s snap, 7 ADU x 0.7 e⁻/ADU read noise);
    SMTN-002's table assumes 2 x 15 s snaps with 8.8 e⁻ read noise each.
    """
    p = BAND_PARAMS[band]
    fwhm_eff = p["fwhm_eff_zenith"] if fwhm_eff is None else fwhm_eff
    sky_mag = p["sky_mag"] if sky_mag is None else sky_mag
    zp = p["zp"] if zp_1e_per_s is None else zp_1e_per_s
    t = exposure_time_s
    sky = t * pixel_scale_arcsec**2 * 10 ** (-0.4 * (sky_mag - p["zp"]))
    var_px = sky + n_snaps * read_noise_e**2 + dark_e_per_s * t
    n_eff = 2.266 * (fwhm_eff / pixel_scale_arcsec) ** 2
    b = n_eff * var_px
    signal = 0.5 * (25.0 + np.sqrt(625.0 + 100.0 * b))
    return float(zp + 2.5 * np.log10(t) - 2.5 * np.log10(signal))


def psf_fwhm_at(visit: Visit, focal_plane_x_mm, focal_plane_y_mm):
    """PSF FWHM (") at a focal-plane position: ``fwhm0 · (1 + g (r/R)²)``, R = 320 mm."""
    r2 = (np.asarray(focal_plane_x_mm, float) ** 2 + np.asarray(focal_plane_y_mm, float) ** 2) / FOCAL_PLANE_RADIUS_MM**2
    return visit.psf_fwhm_arcsec * (1.0 + visit.psf_radial_growth * r2)


def psf_ellipticity_at(visit: Visit, focal_plane_x_mm, focal_plane_y_mm):
    """PSF ellipticity (e1, e2) in focal-plane axes: a constant term (wind, guiding)
    plus a radial pattern growing as (r/R)²."""
    x = np.asarray(focal_plane_x_mm, float)
    y = np.asarray(focal_plane_y_mm, float)
    r2 = (x**2 + y**2) / FOCAL_PLANE_RADIUS_MM**2
    phi2 = 2.0 * np.arctan2(y, x)
    e1 = visit.psf_e1 + visit.psf_e_radial * r2 * np.cos(phi2)
    e2 = visit.psf_e2 + visit.psf_e_radial * r2 * np.sin(phi2)
    return e1, e2


def _lst_deg(mjd):
    """Local mean sidereal time at Cerro Pachón (deg), IAU 1982 GMST to ~0.1 s."""
    d = np.asarray(mjd, float) - 51544.5
    return (280.46061837 + 360.98564736629 * d + CERRO_PACHON_LON_DEG) % 360.0


def _mjd_for_hour_angle(night_mjd, ra_deg, ha_deg):
    """MJD on the night starting at ``night_mjd`` (UT 00h) when the hour angle of ``ra`` is ``ha``.

    Local midnight at Cerro Pachón is ~04:43 UT; pick the solution closest to it.
    """
    target = (ra_deg + ha_deg) % 360.0
    midnight = night_mjd + 4.72 / 24.0
    dlst = ((target - _lst_deg(midnight) + 180.0) % 360.0) - 180.0
    return midnight + dlst / 360.98564736629


def make_visits(
    n_visits: int,
    bands,
    field_ra: float,
    field_dec: float,
    rng: np.random.Generator,
    *,
    start_mjd: float = 60000.0,
    cadence_days: float = 3.0,
    dither_radius_deg: float = 0.2,
    max_hour_angle_deg: float = 37.5,
    seeing_median_arcsec: float = 0.7,
    seeing_sigma_ln: float = 0.3,
    rot_sky_pos_deg: float | None = None,
    moon: bool = False,
    exposure_time_s: float = 30.0,
    first_visit_id: int | None = None,
) -> list[Visit]:
    """Draw ``n_visits`` DC2-like visits of a field.

    Visit ``i`` is taken on night ``start_mjd + i·cadence_days`` (for
    ``cadence_days >= 0.5``) at an hour angle uniform in ±``max_hour_angle_deg``
    (default ±2.5 h); for shorter cadences visits follow each other within the
    first night. Bands cycle through ``bands`` ('g', 'gr', 'g,r' or a sequence). Pointing
    is dithered uniformly within a disk of ``dither_radius_deg``; rotSkyPos is
    uniform in [0, 360) unless fixed. Atmospheric seeing at 500 nm is lognormal
    (median ``seeing_median_arcsec``) clipped to [0.3", 2.0"]: delivered FWHM
    spans ~0.5"–1.3". Clouds: 0–0.05 mag for 85 % of visits, else 0.05 + Exp(0.15)
    (≤ 1 mag). Visit ids are DC2-like: ``100000 + int((mjd − 59580)·2160)``
    (one id per 40 s, increasing with time), unless ``first_visit_id`` is given.
    """
    if isinstance(bands, str):
        bands = bands.split(",") if "," in bands else list(bands)
    bands = [str(b).strip() for b in bands]
    for b in bands:
        if b not in BAND_PARAMS:
            raise ValueError(f"unknown band {b!r}; expected one of {list(BAND_PARAMS)}")
    if n_visits < 1:
        raise ValueError(f"n_visits must be >= 1, got {n_visits}")
    lat = np.radians(CERRO_PACHON_LAT_DEG)
    visits = []
    mjd_prev = -np.inf
    for i in range(n_visits):
        band = bands[i % len(bands)]
        p = BAND_PARAMS[band]
        # Pointing.
        rad = dither_radius_deg * np.sqrt(rng.uniform())
        ang = rng.uniform(0, 2 * np.pi)
        dec = field_dec + rad * np.sin(ang)
        ra = field_ra + rad * np.cos(ang) / np.cos(np.radians(dec))
        rot = rng.uniform(0.0, 360.0) if rot_sky_pos_deg is None else float(rot_sky_pos_deg)
        # Time and airmass.
        ha_draw = rng.uniform(-max_hour_angle_deg, max_hour_angle_deg)
        if cadence_days >= 0.5 or i == 0:
            night = np.floor(start_mjd + i * max(cadence_days, 0.0))
            mjd = _mjd_for_hour_angle(night, ra, ha_draw)
        else:
            mjd = visits[0].mjd + i * cadence_days
        mjd = max(mjd, mjd_prev + 40.0 / 86400.0)
        mjd_prev = mjd
        ha = ((_lst_deg(mjd) - ra + 180.0) % 360.0) - 180.0
        sin_alt = np.sin(lat) * np.sin(np.radians(dec)) + np.cos(lat) * np.cos(np.radians(dec)) * np.cos(np.radians(ha))
        alt = float(np.degrees(np.arcsin(sin_alt)))
        if alt < 15.0:
            raise ValueError(f"visit {i}: field at dec {dec:.2f} is at altitude {alt:.1f} deg (HA {ha:.1f} deg)")
        airmass = float(airmass_from_altitude(alt))
        # Seeing and PSF shape.
        seeing = float(np.clip(seeing_median_arcsec * np.exp(seeing_sigma_ln * rng.normal()), 0.3, 2.0))
        f_eff = float(fwhm_eff_arcsec(band, seeing, airmass))
        f_geom = 0.822 * f_eff + 0.052
        growth = rng.uniform(0.02, 0.06)
        e_mod = abs(rng.normal(0.0, 0.015))
        e_ang = rng.uniform(0, np.pi)
        e_rad = rng.uniform(0.01, 0.04)
        # Sky and clouds.
        sky_mag = p["sky_mag"]
        if moon:
            phase = ((mjd - _NEW_MOON_MJD) / _SYNODIC_DAYS) % 1.0
            illum = 0.5 * (1 - np.cos(2 * np.pi * phase))
            sky_mag -= _MOON_BRIGHTENING[band] * illum * rng.uniform(0.3, 1.0)
        cloud = rng.uniform(0, 0.05) if rng.uniform() < 0.85 else min(0.05 + rng.exponential(0.15), 1.0)
        zp = p["zp"] - p["k"] * (airmass - 1.0) - cloud
        m5 = m5_point_source(band, fwhm_eff=f_eff, sky_mag=sky_mag, zp_1e_per_s=zp, exposure_time_s=exposure_time_s)
        if first_visit_id is None:
            vid = 100000 + int((mjd - DC2_START_MJD) * 2160.0)
        else:
            vid = first_visit_id + i
        visits.append(
            Visit(
                visit=int(vid), band=band, physical_filter=f"{band}_sim_1.4", mjd=float(mjd),
                exposure_time_s=float(exposure_time_s), boresight_ra=float(ra), boresight_dec=float(dec),
                rot_sky_pos_deg=float(rot), hour_angle_deg=float(ha), altitude_deg=alt, airmass=airmass,
                seeing_500nm_arcsec=seeing, fwhm_eff_arcsec=f_eff, psf_fwhm_arcsec=float(f_geom),
                sky_mag_arcsec2=float(sky_mag), cloud_mag=float(cloud), zp_1e_per_s=float(zp), m5=m5,
                psf_radial_growth=float(growth), psf_e1=float(e_mod * np.cos(2 * e_ang)),
                psf_e2=float(e_mod * np.sin(2 * e_ang)), psf_e_radial=float(e_rad),
            )
        )
    ids = [v.visit for v in visits]
    if len(set(ids)) != len(ids):
        raise ValueError("visit ids collide; pass first_visit_id")
    return visits


def visits_table(visits) -> pd.DataFrame:
    """One row per visit (all `Visit` fields plus ``zp_exposure``)."""
    rows = []
    for v in visits:
        row = asdict(v)
        row["zp_exposure"] = v.zp_exposure
        rows.append(row)
    return pd.DataFrame(rows)
