"""A deterministic DC2-like sky: stars, variable stars, galaxies, transients, moving objects.

The sky is generated cell by cell on a fixed grid of ~0.25 deg cells, each cell
seeded from ``(sky_seed, cell_id, kind)``. A region is the union of the cells it
touches, cut to the region, so *any* sub-region generated from the same seed is
exactly the cut of a larger one: per-detector, per-patch and whole-field
catalogues agree object for object (same ids, positions, fluxes).

Numbers and their sources (approximate; chosen to resemble DC2 at |b| ~ 47 deg):

- Stars: differential counts dN/dr ∝ 10^(0.2 r) between r = 14 and 26, normalised to
  N(r < 24) = 4000 deg⁻² (a power law shaped after the Galfast/Juric et al. 2008
  high-latitude counts that DC2 used; slope within the 0.2–0.3 dex/mag of the
  halo-dominated faint end). ~25 deg⁻² are brighter than r = 16 and saturate.
  Colours follow the SDSS stellar locus (Covey et al. 2007, AJ 134, 2398: g−r,
  r−i, i−z along the main sequence; z−y extrapolated), a mixture of halo
  turn-off stars (g−r ≈ 0.3) and M dwarfs (g−r ≈ 1.4) whose red fraction grows
  with magnitude, with 0.03 mag scatter per colour. 10 % of stars are periodic
  variables (period log-uniform 0.1–10 d, peak-to-peak r amplitude 0.05–0.5 mag,
  larger in the blue).
- Galaxies: cumulative counts N(<i) = 46·10^(0.31(i−25)) arcmin⁻² (LSST Science
  Book eq. 3.7, valid 20.5 < i < 25.5; slope 0.45 brighter than i = 20), cut at
  ``galaxy_mag_limit`` in r (default r < 25: ~35 arcmin⁻², ~6000 per detector;
  DC2 goes deeper but galaxies fainter than that add little to AP). Red-sequence
  and blue-cloud colours; bulge (de Vaucouleurs) + disk (exponential) with the
  bulge fraction by population; median half-light radius
  0.8"·10^(−0.09 (i−21)) with 0.2 dex scatter (an approximate fit to HST/COSMOS
  sizes); intrinsic ellipticity |g| Rayleigh(σ = 0.2 per component) capped at 0.8.
- Transients: supernova-like light curves (see `transient_flux_ratio`), peak r
  uniform in 19–25, explosion times uniform over the science window, 70 % on a
  host galaxy (offset drawn from the host's disk light), 30 % hostless.
- Moving objects (optional): linear motion, main-belt-like rates (~0.25 deg/day).

Columns of `SkyCatalog.table` (NaN where not applicable):
``id`` (int64), ``type`` ('star', 'variable', 'galaxy', 'transient', 'moving'),
``ra``, ``dec`` (deg; for moving objects at ``epoch_mjd``), ``mag_{band}`` (AB:
mean magnitude; for transients the peak magnitude), ``host_id`` (-1 if none),
``hlr_disk_arcsec``, ``hlr_bulge_arcsec``, ``bulge_frac``, ``ellip_g``,
``pa_deg`` (major axis, east of north), ``var_period_d``, ``var_amp_mag``
(peak-to-peak in r), ``var_phase``, ``t_explosion_mjd``, ``rise_days``,
``decline_mag_per_day`` (r), ``dra_cosdec_deg_per_day``, ``ddec_deg_per_day``,
``epoch_mjd``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..exposure.photo_calib import mag_to_njy, njy_to_mag

__all__ = [
    "BANDS",
    "GALAXY_DENSITY_I25_PER_ARCMIN2",
    "STAR_DENSITY_R24_PER_DEG2",
    "SkyCatalog",
    "flux_njy",
    "mag_to_njy",
    "make_sky_catalog",
    "make_sky_catalog_cone",
    "njy_to_mag",
    "reference_catalog",
    "transient_flux_ratio",
]

BANDS = ("u", "g", "r", "i", "z", "y")
CELL_DEG = 0.25
STAR_DENSITY_R24_PER_DEG2 = 4000.0
STAR_SLOPE_DEX_PER_MAG = 0.2
GALAXY_DENSITY_I25_PER_ARCMIN2 = 46.0
_KIND = {"star": 1, "galaxy": 2, "transient": 3, "moving": 4}

# Stellar locus nodes (u-g, g-r, r-i, i-z, z-y), hot to cool; Covey et al. 2007, approximate.
_LOCUS = np.array(
    [
        [0.95, 0.15, 0.03, 0.00, 0.00],
        [1.05, 0.30, 0.10, 0.03, 0.02],
        [1.20, 0.45, 0.16, 0.06, 0.04],
        [1.60, 0.65, 0.22, 0.11, 0.06],
        [2.30, 1.05, 0.40, 0.22, 0.12],
        [2.50, 1.35, 0.70, 0.37, 0.20],
        [2.55, 1.45, 1.10, 0.55, 0.30],
        [2.60, 1.50, 1.60, 0.85, 0.45],
        [2.70, 1.55, 2.20, 1.15, 0.60],
    ]
)
# Relative variability amplitude per band (pulsators vary more in the blue).
_VAR_AMP_SCALE = {"u": 1.4, "g": 1.2, "r": 1.0, "i": 0.85, "z": 0.75, "y": 0.7}
# Supernova template per band: peak mag offset from r, peak delay (d), initial and tail decline (mag/d).
_SN_PEAK_OFFSET = {"u": 1.0, "g": 0.2, "r": 0.0, "i": 0.1, "z": 0.3, "y": 0.5}
_SN_PEAK_DELAY_D = {"u": -2.0, "g": -1.0, "r": 0.0, "i": 1.5, "z": 2.5, "y": 3.0}
_SN_DECLINE_SCALE = {"u": 1.6, "g": 1.3, "r": 1.0, "i": 0.8, "z": 0.7, "y": 0.6}
_SN_TAIL_MAG_PER_DAY = 0.02


@dataclass
class SkyCatalog:
    """Objects in a sky region; see the module docstring for the columns.

    Attributes
    ----------
    table : `pandas.DataFrame`
        One row per object.
    bands : `tuple` of `str`
        Bands that have ``mag_{band}`` columns.
    region : `dict`
        What was asked for (box or cone) and the sky seed.
    """

    table: pd.DataFrame
    bands: tuple[str, ...] = BANDS
    region: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def select(self, mask) -> SkyCatalog:
        """A new catalogue holding the rows where ``mask`` is true."""
        return SkyCatalog(self.table[np.asarray(mask, bool)].reset_index(drop=True), self.bands, self.region)

    def flux_njy(self, band: str, mjd: float) -> np.ndarray:
        """True flux of every object in ``band`` at ``mjd`` (see `flux_njy`)."""
        return flux_njy(self, band, mjd)

    def positions_at(self, mjd: float) -> tuple[np.ndarray, np.ndarray]:
        """(ra, dec) in degrees at ``mjd``; only moving objects move."""
        t = self.table
        ra = t["ra"].to_numpy(float).copy()
        dec = t["dec"].to_numpy(float).copy()
        moving = (t["type"] == "moving").to_numpy()
        if moving.any():
            dt = mjd - t["epoch_mjd"].to_numpy(float)[moving]
            dec[moving] += t["ddec_deg_per_day"].to_numpy(float)[moving] * dt
            ra[moving] += (
                t["dra_cosdec_deg_per_day"].to_numpy(float)[moving] * dt / np.cos(np.radians(dec[moving]))
            )
        return ra, dec


def transient_flux_ratio(dt_days, rise_days, decline_mag_per_day):
    """Supernova-like light curve, as a fraction of the peak flux.

    ``dt_days`` is the time since explosion (already shifted by the band's
    peak delay). Rise: a smooth-step :math:`x^2 (3 - 2x)` with
    :math:`x = dt / t_{rise}` (t² at early times, zero slope at peak). Decline:
    :math:`\\Delta m = \\beta\\, s^2/(s + 5) + 0.02\\,\\max(s - 40, 0)` mag with
    ``s`` days after peak — a rounded peak, then ~β mag/day, then a slower tail.
    """
    dt = np.asarray(dt_days, dtype=float)
    rise = np.asarray(rise_days, dtype=float)
    beta = np.asarray(decline_mag_per_day, dtype=float)
    x = np.clip(dt / rise, 0.0, 1.0)
    rising = x * x * (3.0 - 2.0 * x)
    s = np.maximum(dt - rise, 0.0)
    s_fast = np.minimum(s, 40.0)
    dmag = beta * s_fast**2 / (s_fast + 5.0) + _SN_TAIL_MAG_PER_DAY * np.maximum(s - 40.0, 0.0)
    out = np.where(dt <= rise, rising, 10.0 ** (-0.4 * dmag))
    return np.where(dt > 0, out, 0.0)


def flux_njy(catalog: SkyCatalog, band: str, mjd: float) -> np.ndarray:
    """True flux in nJy of every catalogue object in ``band`` at time ``mjd``.

    Stars, galaxies and moving objects are constant; variables follow a sinusoid
    in magnitude around their mean; transients follow `transient_flux_ratio`
    times their peak flux (zero before explosion). Host galaxies are unchanged.
    """
    if band not in catalog.bands:
        raise ValueError(f"band {band!r} not in catalogue bands {catalog.bands}")
    t = catalog.table
    mag = t[f"mag_{band}"].to_numpy(float).copy()
    kind = t["type"].to_numpy()
    var = kind == "variable"
    if var.any():
        amp = t["var_amp_mag"].to_numpy(float)[var] * _VAR_AMP_SCALE[band]
        phase = (mjd / t["var_period_d"].to_numpy(float)[var] + t["var_phase"].to_numpy(float)[var]) % 1.0
        mag[var] += 0.5 * amp * np.sin(2.0 * np.pi * phase)
    flux = mag_to_njy(mag)
    tr = kind == "transient"
    if tr.any():
        dt = mjd - t["t_explosion_mjd"].to_numpy(float)[tr] - _SN_PEAK_DELAY_D[band]
        ratio = transient_flux_ratio(
            dt,
            t["rise_days"].to_numpy(float)[tr],
            t["decline_mag_per_day"].to_numpy(float)[tr] * _SN_DECLINE_SCALE[band],
        )
        flux[tr] *= ratio
    return flux


# --------------------------------------------------------------------------- generation
def _cells_for_box(ra_min, ra_max, dec_min, dec_max):
    """Yield (cell_id, ra0, ra1, dec0, dec1) of the grid cells touching the box."""
    j0 = int(np.floor((dec_min + 90.0) / CELL_DEG))
    j1 = int(np.floor((min(dec_max, 89.999999) + 90.0) / CELL_DEG))
    for j in range(j0, j1 + 1):
        d0 = -90.0 + j * CELL_DEG
        d1 = d0 + CELL_DEG
        dc = np.radians(0.5 * (d0 + d1))
        n_ra = max(1, int(360.0 * np.cos(dc) / CELL_DEG))
        w = 360.0 / n_ra
        for i in range(int(np.floor(ra_min / w)), int(np.floor(ra_max / w)) + 1):
            yield j * 2000 + i, i * w, (i + 1) * w, d0, d1


def _uniform_positions(rng, n, ra0, ra1, dec0, dec1):
    ra = rng.uniform(ra0, ra1, n)
    s0, s1 = np.sin(np.radians(dec0)), np.sin(np.radians(dec1))
    dec = np.degrees(np.arcsin(rng.uniform(s0, s1, n)))
    return ra, dec


def _cell_area_deg2(ra0, ra1, dec0, dec1):
    return np.degrees(np.radians(ra1 - ra0)) * np.degrees(np.sin(np.radians(dec1)) - np.sin(np.radians(dec0)))


def _power_law_mags(rng, n, m_lo, m_hi, slope_dex):
    """Magnitudes with dN/dm ∝ 10^(slope m) between m_lo and m_hi (inverse CDF)."""
    u = rng.uniform(size=n)
    a, b = 10.0 ** (slope_dex * m_lo), 10.0 ** (slope_dex * m_hi)
    return np.log10(a + u * (b - a)) / slope_dex


def _empty_columns(n, bands):
    cols = {"id": np.zeros(n, np.int64), "type": np.empty(n, object), "ra": np.zeros(n), "dec": np.zeros(n)}
    for b in bands:
        cols[f"mag_{b}"] = np.full(n, np.nan)
    cols["host_id"] = np.full(n, -1, np.int64)
    for name in ["hlr_disk_arcsec", "hlr_bulge_arcsec", "bulge_frac", "ellip_g", "pa_deg", "var_period_d", "var_amp_mag", "var_phase", "t_explosion_mjd", "rise_days", "decline_mag_per_day", "dra_cosdec_deg_per_day", "ddec_deg_per_day", "epoch_mjd"]:
        cols[name] = np.full(n, np.nan)
    return cols


def _colours_to_mags(r, colours, bands):
    """colours: (n, 5) u-g, g-r, r-i, i-z, z-y; returns dict band -> mag from r."""
    ug, gr, ri, iz, zy = colours.T
    g = r + gr
    i = r - ri
    z = i - iz
    full = {"u": g + ug, "g": g, "r": r, "i": i, "z": z, "y": z - zy}
    return {b: full[b] for b in bands}


def _make_stars(rng, area, cfg):
    m_lo, m_hi = cfg["star_mag_range"]
    k = STAR_SLOPE_DEX_PER_MAG
    n_per_deg2 = STAR_DENSITY_R24_PER_DEG2 * (10 ** (k * m_hi) - 10 ** (k * m_lo)) / (
        10 ** (k * 24.0) - 10 ** (k * m_lo)
    )
    n = rng.poisson(n_per_deg2 * area * cfg["star_density_scale"])
    r = _power_law_mags(rng, n, m_lo, m_hi, k)
    # Position along the locus: blue halo turn-off or red M dwarfs, red fraction rising with r.
    p_red = 0.15 + 0.35 * np.clip((r - 16.0) / 8.0, 0.0, 1.0)
    red = rng.uniform(size=n) < p_red
    s = np.where(red, rng.uniform(4.6, 8.0, n), np.clip(rng.normal(1.6, 0.8, n), 0.0, 4.5))
    lo = np.floor(s).astype(int).clip(0, len(_LOCUS) - 2)
    f = (s - lo)[:, None]
    colours = _LOCUS[lo] * (1 - f) + _LOCUS[lo + 1] * f + rng.normal(0, 0.03, (n, 5))
    variable = rng.uniform(size=n) < cfg["variable_fraction"]
    period = 10 ** rng.uniform(-1, 1, n)
    amp = rng.uniform(0.05, 0.5, n)
    phase = rng.uniform(size=n)
    return r, colours, variable, period, amp, phase


def _make_galaxies(rng, area, cfg):
    r_lim = cfg["galaxy_mag_limit"]
    i_hi = r_lim + 0.3
    i_lo, i_knee = 16.0, 20.0
    n_arcmin2 = GALAXY_DENSITY_I25_PER_ARCMIN2 * 10 ** (0.31 * (i_hi - 25.0))
    n_knee = GALAXY_DENSITY_I25_PER_ARCMIN2 * 10 ** (0.31 * (i_knee - 25.0))
    n_lo = n_knee * 10 ** (0.45 * (i_lo - i_knee))
    n = rng.poisson((n_arcmin2 - n_lo) * 3600.0 * area * cfg["galaxy_density_scale"])
    bright = rng.uniform(size=n) < (n_knee - n_lo) / (n_arcmin2 - n_lo)
    i = np.where(
        bright,
        _power_law_mags(rng, n, i_lo, i_knee, 0.45),
        _power_law_mags(rng, n, i_knee, i_hi, 0.31),
    )
    red = rng.uniform(size=n) < np.clip(0.35 - 0.04 * (i - 20.0), 0.12, 0.35)
    # (u-g, g-r, r-i, i-z, z-y): red sequence vs blue cloud, broadened for redshift spread.
    mean = np.where(red[:, None], [1.7, 0.95, 0.45, 0.32, 0.18], [0.8, 0.45, 0.28, 0.15, 0.08])
    sig = np.where(red[:, None], [0.3, 0.15, 0.12, 0.1, 0.08], [0.3, 0.15, 0.12, 0.1, 0.08])
    colours = mean + sig * rng.normal(size=(n, 5))
    r = i + colours[:, 2]
    bulge_frac = np.where(red, rng.uniform(0.4, 0.9, n), np.where(rng.uniform(size=n) < 0.5, 0.0, rng.uniform(0, 0.3, n)))
    hlr = 0.8 * 10 ** (-0.09 * (i - 21.0) + rng.normal(0, 0.2, n))
    hlr = np.clip(hlr, 0.05, 5.0)
    hlr_bulge = np.clip(hlr * rng.uniform(0.3, 0.6, n), 0.03, 3.0)
    g = np.minimum(np.hypot(rng.normal(0, 0.2, n), rng.normal(0, 0.2, n)), 0.8)
    pa = rng.uniform(0, 180, n)
    keep = r < r_lim
    return (r[keep], colours[keep], bulge_frac[keep], hlr[keep], hlr_bulge[keep], g[keep], pa[keep])


def _generate_cell(sky_seed, cell, bands, cfg):
    cell_id, ra0, ra1, dec0, dec1 = cell
    area = _cell_area_deg2(ra0, ra1, dec0, dec1)
    parts = []
    k_next = 0

    def new_ids(n):
        nonlocal k_next
        ids = cell_id * 100000 + k_next + np.arange(n, dtype=np.int64)
        k_next += n
        if k_next >= 100000:
            raise ValueError(f"sky cell {cell_id} holds more than 100000 objects; lower the densities")
        return ids

    # Stars and variables.
    rng = np.random.default_rng([sky_seed, cell_id, _KIND["star"]])
    r, colours, variable, period, amp, phase = _make_stars(rng, area, cfg)
    n = len(r)
    cols = _empty_columns(n, bands)
    cols["id"] = new_ids(n)
    cols["type"][:] = np.where(variable, "variable", "star")
    cols["ra"], cols["dec"] = _uniform_positions(rng, n, ra0, ra1, dec0, dec1)
    for b, m in _colours_to_mags(r, colours, bands).items():
        cols[f"mag_{b}"] = m
    cols["var_period_d"] = np.where(variable, period, np.nan)
    cols["var_amp_mag"] = np.where(variable, amp, np.nan)
    cols["var_phase"] = np.where(variable, phase, np.nan)
    parts.append(pd.DataFrame(cols))

    # Galaxies.
    rng = np.random.default_rng([sky_seed, cell_id, _KIND["galaxy"]])
    r, colours, bulge_frac, hlr, hlr_bulge, g, pa = _make_galaxies(rng, area, cfg)
    n = len(r)
    gal = _empty_columns(n, bands)
    gal["id"] = new_ids(n)
    gal["type"][:] = "galaxy"
    gal["ra"], gal["dec"] = _uniform_positions(rng, n, ra0, ra1, dec0, dec1)
    for b, m in _colours_to_mags(r, colours, bands).items():
        gal[f"mag_{b}"] = m
    gal.update(hlr_disk_arcsec=hlr, hlr_bulge_arcsec=hlr_bulge, bulge_frac=bulge_frac, ellip_g=g, pa_deg=pa)
    parts.append(pd.DataFrame(gal))

    # Transients.
    rng = np.random.default_rng([sky_seed, cell_id, _KIND["transient"]])
    n = rng.poisson(cfg["transients_per_deg2"] * area)
    tr = _empty_columns(n, bands)
    tr["id"] = new_ids(n)
    tr["type"][:] = "transient"
    ra, dec = _uniform_positions(rng, n, ra0, ra1, dec0, dec1)
    hosted = (rng.uniform(size=n) < cfg["transient_host_fraction"]) & (len(r) > 0)
    if hosted.any():
        h = rng.integers(0, len(r), n)
        # Offset drawn from the host's exponential disk (scale = hlr / 1.678), sheared like the host.
        radius = rng.gamma(2.0, hlr[h] / 1.678)
        theta = rng.uniform(0, 2 * np.pi, n)
        a, bq = radius * np.cos(theta), radius * np.sin(theta) * (1 - g[h]) / (1 + g[h])
        pa_r = np.radians(pa[h])
        d_north = (a * np.cos(pa_r) - bq * np.sin(pa_r)) / 3600.0
        d_east = (a * np.sin(pa_r) + bq * np.cos(pa_r)) / 3600.0
        hdec = gal["dec"][h] + d_north
        hra = gal["ra"][h] + d_east / np.cos(np.radians(hdec))
        ra = np.where(hosted, hra, ra)
        dec = np.where(hosted, hdec, dec)
        tr["host_id"] = np.where(hosted, gal["id"][h], -1)
    tr["ra"], tr["dec"] = ra, dec
    peak_r = rng.uniform(*cfg["transient_peak_mag_range"], n)
    for b in bands:
        tr[f"mag_{b}"] = peak_r + _SN_PEAK_OFFSET[b] + rng.normal(0, 0.1, n)
    tr["rise_days"] = rng.uniform(15.0, 20.0, n)
    tr["decline_mag_per_day"] = rng.uniform(0.04, 0.08, n)
    t0, t1 = cfg["mjd_range"]
    tr["t_explosion_mjd"] = rng.uniform(t0 - tr["rise_days"] - 20.0, t1)
    parts.append(pd.DataFrame(tr))

    # Moving objects.
    rng = np.random.default_rng([sky_seed, cell_id, _KIND["moving"]])
    n = rng.poisson(cfg["moving_per_deg2"] * area)
    mv = _empty_columns(n, bands)
    mv["id"] = new_ids(n)
    mv["type"][:] = "moving"
    mv["ra"], mv["dec"] = _uniform_positions(rng, n, ra0, ra1, dec0, dec1)
    r = rng.uniform(19.0, 24.0, n)
    solar = np.array([1.45, 0.45, 0.12, 0.03, 0.02]) + rng.normal(0, 0.05, (n, 5))
    for b, m in _colours_to_mags(r, solar, bands).items():
        mv[f"mag_{b}"] = m
    speed = rng.uniform(0.05, 0.5, n)
    angle = rng.uniform(0, 2 * np.pi, n)
    mv["dra_cosdec_deg_per_day"] = speed * np.cos(angle)
    mv["ddec_deg_per_day"] = speed * np.sin(angle)
    mv["epoch_mjd"] = np.full(n, 0.5 * (t0 + t1))
    parts.append(pd.DataFrame(mv))
    return pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else None


def make_sky_catalog(
    ra_min: float,
    ra_max: float,
    dec_min: float,
    dec_max: float,
    rng: np.random.Generator,
    *,
    bands=BANDS,
    mjd_range=(60000.0, 60060.0),
    transients_per_deg2: float = 400.0,
    transient_host_fraction: float = 0.7,
    transient_peak_mag_range=(19.0, 25.0),
    moving_per_deg2: float = 0.0,
    galaxy_mag_limit: float = 25.0,
    star_mag_range=(14.0, 26.0),
    variable_fraction: float = 0.1,
    star_density_scale: float = 1.0,
    galaxy_density_scale: float = 1.0,
) -> SkyCatalog:
    """Generate the sky in an RA/Dec box (degrees; no wrap through RA = 0).

    One 63-bit sky seed is drawn from ``rng``; the catalogue of any sub-box made
    from a generator in the same state is the cut of this one (see module docs).

    Parameters
    ----------
    mjd_range : `tuple`
        Science-visit window; transient explosions are uniform in
        ``[start - rise - 20 d, end]`` so every one is seen at some phase.
    transients_per_deg2 : `float`
        Transient density (default 400 deg⁻²: ~20 per 4k x 4k detector).
    galaxy_mag_limit : `float`
        Faintest galaxy r magnitude drawn (rendering cost grows ~2x per 1 mag).
    """
    bands = tuple(bands)
    bad = [b for b in bands if b not in BANDS]
    if bad:
        raise ValueError(f"unknown band(s) {bad}; expected a subset of {BANDS}")
    if not (0.0 <= ra_min < ra_max <= 360.0) or not (-90.0 <= dec_min < dec_max <= 90.0):
        raise ValueError(f"bad sky box ra [{ra_min}, {ra_max}], dec [{dec_min}, {dec_max}]")
    cfg = {
        "mjd_range": tuple(mjd_range),
        "transients_per_deg2": transients_per_deg2,
        "transient_host_fraction": transient_host_fraction,
        "transient_peak_mag_range": tuple(transient_peak_mag_range),
        "moving_per_deg2": moving_per_deg2,
        "galaxy_mag_limit": galaxy_mag_limit,
        "star_mag_range": tuple(star_mag_range),
        "variable_fraction": variable_fraction,
        "star_density_scale": star_density_scale,
        "galaxy_density_scale": galaxy_density_scale,
    }
    sky_seed = int(rng.integers(0, 2**63 - 1))
    frames = []
    for cell in _cells_for_box(ra_min, ra_max, dec_min, dec_max):
        df = _generate_cell(sky_seed, cell, bands, cfg)
        if df is None:
            continue
        inside = (df["ra"] >= ra_min) & (df["ra"] < ra_max) & (df["dec"] >= dec_min) & (df["dec"] < dec_max)
        frames.append(df[inside])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(_empty_columns(0, bands))
    table["type"] = table["type"].astype(str)
    region = dict(kind="box", ra_min=ra_min, ra_max=ra_max, dec_min=dec_min, dec_max=dec_max, sky_seed=sky_seed, **cfg)
    return SkyCatalog(table.reset_index(drop=True), bands, region)


def make_sky_catalog_cone(ra: float, dec: float, radius_deg: float, rng: np.random.Generator, **kwargs) -> SkyCatalog:
    """The sky within ``radius_deg`` of (ra, dec); keywords as `make_sky_catalog`."""
    half_ra = radius_deg / max(np.cos(np.radians(min(abs(dec) + radius_deg, 89.9))), 1e-6)
    sky = make_sky_catalog(
        max(ra - half_ra, 0.0), min(ra + half_ra, 360.0),
        max(dec - radius_deg, -90.0), min(dec + radius_deg, 90.0), rng, **kwargs,
    )
    t = sky.table
    ra1, dec1, ra0, dec0 = map(np.radians, (t["ra"].to_numpy(float), t["dec"].to_numpy(float), ra, dec))
    cos_d = np.sin(dec0) * np.sin(dec1) + np.cos(dec0) * np.cos(dec1) * np.cos(ra1 - ra0)
    out = sky.select(cos_d >= np.cos(np.radians(radius_deg)))
    out.region = dict(sky.region, kind="cone", ra=ra, dec=dec, radius_deg=radius_deg)
    return out


def reference_catalog(
    sky: SkyCatalog,
    rng: np.random.Generator,
    bands=None,
    *,
    mag_limit_r: float = 23.0,
    include_galaxies: bool = False,
    pos_sigma_mas: float = 0.1,
    mag_sigma: float = 0.001,
) -> pd.DataFrame:
    """A ``cal_ref_cat_2_2``-like reference catalogue of the stars to r <= 23.

    Columns: ``id``, ``coord_ra``, ``coord_dec`` (deg, smeared by
    ``pos_sigma_mas``), ``lsst_{band}_flux`` (true mean flux, nJy),
    ``lsst_{band}_smeared_flux`` (smeared by ``mag_sigma`` mag) and
    ``lsst_{band}_smeared_fluxErr`` (= flux · mag_sigma · ln10/2.5),
    ``is_star``. Variables appear with their mean flux (as in DC2's refcat);
    transients and moving objects never. ``include_galaxies`` adds compact
    galaxies (disk half-light radius < 0.3").
    """
    bands = tuple(bands) if bands is not None else sky.bands
    t = sky.table
    kind = t["type"].to_numpy()
    keep = np.isin(kind, ["star", "variable"])
    if include_galaxies:
        keep |= (kind == "galaxy") & (t["hlr_disk_arcsec"].to_numpy(float) < 0.3)
    keep &= t["mag_r"].to_numpy(float) <= mag_limit_r if "mag_r" in t else True
    sel = t[keep]
    n = len(sel)
    dec = sel["dec"].to_numpy(float)
    sig_deg = pos_sigma_mas / 3.6e6
    out = {
        "id": sel["id"].to_numpy(np.int64),
        "coord_ra": sel["ra"].to_numpy(float) + rng.normal(0, sig_deg, n) / np.cos(np.radians(dec)),
        "coord_dec": dec + rng.normal(0, sig_deg, n),
        "is_star": np.isin(sel["type"].to_numpy(), ["star", "variable"]),
    }
    for b in bands:
        true = mag_to_njy(sel[f"mag_{b}"].to_numpy(float))
        smeared = true * 10 ** (-0.4 * rng.normal(0, mag_sigma, n))
        out[f"lsst_{b}_flux"] = true
        out[f"lsst_{b}_smeared_flux"] = smeared
        out[f"lsst_{b}_smeared_fluxErr"] = smeared * mag_sigma * np.log(10) / 2.5
    return pd.DataFrame(out)
