"""Simulation presets: DC2-like data sets shaped like the guide's collections.

=============  ==========================================================  ================================
preset         what                                                        collection (CHAINED)
=============  ==========================================================  ================================
``ci_imsim``   tract 3828 patch 24, detector R22_S11 cropped to            ``2.2i/defaults/ci_imsim``
               2048 x 2000 px, g band, 8 template-epoch + 5 science
               visits: the embedded demo (like testdata_ci_imsim)
``4patch_4431`` visits fully overlapping patches 9, 10, 16, 17 of tract    ``2.2i/defaults/4patch_4431``
               4431, raft R22's nine full-size 4k x 4k detectors, g band   (the guide's
               (10 + 10 visits): for benchmarks and big runs               ``u/mrawls/DM-34827/defaults/4patch_4431``)
``test``       tract 3828 patch 24, one detector cropped to 800 x 800 px,  ``2.2i/defaults/test``
               denser stars, 6 + 3 visits: for unit tests
=============  ==========================================================  ================================

Every preset also fills the guide's common collections: ``2.2i/raw/all``,
``2.2i/calib``, ``skymaps``, ``refcats`` and the chain ``2.2i/defaults``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """What to simulate. Sizes in pixels, densities per square degree."""

    name: str
    description: str
    tract: int
    patches: tuple[int, ...]
    detectors: tuple[int, ...]
    #: per-amplifier data shape (rows, columns); (2000, 509) is a full 4072 x 4000 detector
    amp_data_shape: tuple[int, int]
    bands: tuple[str, ...] = ("g",)
    n_template_visits: int = 8
    n_science_visits: int = 5
    #: radius of the random pointing offsets; small for cropped detectors so
    #: that every visit sees the same patch of sky
    dither_radius_deg: float = 20.0 / 3600
    template_start_mjd: float = 59945.0
    science_start_mjd: float = 60250.0
    cadence_days: float = 3.0
    transients_per_deg2: float = 2000.0
    star_density_scale: float = 1.0
    galaxy_density_scale: float = 1.0
    moving_per_deg2: float = 0.0
    #: the preset's own CHAINED collection
    collection: str = ""

    def with_bands(self, bands) -> Preset:
        return dataclasses.replace(self, bands=tuple(bands))

    @property
    def n_visits_per_band(self) -> int:
        return self.n_template_visits + self.n_science_visits

    @property
    def template_season_day_obs(self) -> int:
        """First ``day_obs`` of the science season: ``day_obs < this`` selects the
        template-epoch visits (templates are built from earlier data, as in Rubin's AP)."""
        from astropy.time import Time

        return int(Time(self.science_start_mjd - 1.0, format="mjd", scale="tai").utc.strftime("%Y%m%d"))


PRESETS: dict[str, Preset] = {
    "ci_imsim": Preset(
        name="ci_imsim",
        description="tract 3828 patch 24, one cropped detector, g band: the embedded demo",
        tract=3828,
        patches=(24,),
        detectors=(94,),
        amp_data_shape=(1000, 256),
        n_template_visits=8,
        n_science_visits=5,
        transients_per_deg2=3000.0,
        collection="2.2i/defaults/ci_imsim",
    ),
    "4patch_4431": Preset(
        name="4patch_4431",
        description="visits fully overlapping patches 9, 10, 16, 17 of tract 4431; raft R22, full-size detectors",
        tract=4431,
        patches=(9, 10, 16, 17),
        detectors=tuple(range(90, 99)),
        amp_data_shape=(2000, 509),
        n_template_visits=10,
        n_science_visits=10,
        dither_radius_deg=0.02,
        transients_per_deg2=400.0,
        collection="2.2i/defaults/4patch_4431",
    ),
    "test": Preset(
        name="test",
        description="tract 3828 patch 24, one detector cropped to 800 x 800 px: for unit tests",
        tract=3828,
        patches=(24,),
        detectors=(94,),
        amp_data_shape=(400, 100),
        n_template_visits=6,
        n_science_visits=3,
        dither_radius_deg=8.0 / 3600,
        transients_per_deg2=20000.0,
        # a small detector holds few stars at DC2 density; PSF and astrometry fits need ~30
        star_density_scale=10.0,
        collection="2.2i/defaults/test",
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error lists the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"Unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
