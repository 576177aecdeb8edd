"""The exposure: image, mask and variance planes with the WCS, PSF, photometric
calibration and observation metadata that every pipeline stage passes along.

This is diapipe's stand-in for afw's ``ExposureF``: plain numpy arrays and
astropy objects, so any scientist can poke at it in a notebook.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .masks import MASK_DTYPE
from .photo_calib import PhotoCalib
from .psf import PixelPsf

__all__ = ["Exposure", "VisitInfo", "PhotoCalib", "Box"]

#: (x0, y0, width, height) in parent pixel coordinates
Box = tuple[int, int, int, int]



@dataclass(frozen=True)
class VisitInfo:
    """What was observed, when and how (afw VisitInfo's fields that AP uses).

    Times are TAI MJD at the exposure midpoint; angles in degrees.
    """

    instrument: str = ""
    exposure: int | None = None
    visit: int | None = None
    detector: int | None = None
    physical_filter: str = ""
    band: str = ""
    exposure_time_s: float = 0.0
    dark_time_s: float = 0.0
    mjd_tai: float = float("nan")
    boresight_ra_deg: float = float("nan")
    boresight_dec_deg: float = float("nan")
    rot_sky_pos_deg: float = float("nan")
    airmass: float = float("nan")
    observation_type: str = "science"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisitInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Unknown VisitInfo fields {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> VisitInfo:
        return dataclasses.replace(self, **changes)


@dataclass
class Exposure:
    """Image, mask and variance with their metadata.

    Parameters
    ----------
    image, variance : `numpy.ndarray` (float32), shape (ny, nx)
    mask : `numpy.ndarray` (int32), shape (ny, nx); planes in `diapipe.exposure.masks`
    wcs : `astropy.wcs.WCS` or None
        Maps PARENT pixel coordinates (0-based, including ``xy0``) to the sky.
    psf : `PixelPsf` or None
        PSF model in parent pixel coordinates.
    photo_calib : `PhotoCalib` or None
    visit_info : `VisitInfo` or None
    metadata : `dict`
        JSON-serialisable scalars, lists and dicts (provenance, QA numbers).
    xy0 : (int, int)
        Parent coordinates of pixel ``[0, 0]`` (a cut-out, a patch, an amp).
    """

    image: np.ndarray
    mask: np.ndarray | None = None
    variance: np.ndarray | None = None
    wcs: Any = None
    psf: PixelPsf | None = None
    photo_calib: PhotoCalib | None = None
    visit_info: VisitInfo | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    xy0: tuple[int, int] = (0, 0)

    def __post_init__(self):
        self.image = np.asarray(self.image, dtype=np.float32)
        if self.image.ndim != 2:
            raise ValueError(f"Exposure image must be 2-d, got shape {self.image.shape}")
        if self.mask is None:
            self.mask = np.zeros(self.image.shape, dtype=MASK_DTYPE)
        else:
            self.mask = np.asarray(self.mask, dtype=MASK_DTYPE)
        if self.variance is None:
            self.variance = np.zeros(self.image.shape, dtype=np.float32)
        else:
            self.variance = np.asarray(self.variance, dtype=np.float32)
        for name in ("mask", "variance"):
            if getattr(self, name).shape != self.image.shape:
                raise ValueError(
                    f"Exposure {name} shape {getattr(self, name).shape} differs from image {self.image.shape}"
                )
        self.xy0 = (int(self.xy0[0]), int(self.xy0[1]))

    # -- geometry ----------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape

    @property
    def bbox(self) -> Box:
        """(x0, y0, width, height) in parent coordinates."""
        return (self.xy0[0], self.xy0[1], self.image.shape[1], self.image.shape[0])

    def subimage(self, bbox: Box) -> Exposure:
        """A cut-out (copy) of a parent-coordinate box; the box must lie inside."""
        x0, y0, width, height = (int(v) for v in bbox)
        ix, iy = x0 - self.xy0[0], y0 - self.xy0[1]
        if ix < 0 or iy < 0 or ix + width > self.shape[1] or iy + height > self.shape[0] or width <= 0 or height <= 0:
            raise ValueError(f"Box {bbox} is not inside the exposure's box {self.bbox}")
        sl = (slice(iy, iy + height), slice(ix, ix + width))
        return dataclasses.replace(
            self,
            image=self.image[sl].copy(),
            mask=self.mask[sl].copy(),
            variance=self.variance[sl].copy(),
            metadata=dict(self.metadata),
            xy0=(x0, y0),
        )

    def copy(self) -> Exposure:
        return dataclasses.replace(
            self,
            image=self.image.copy(),
            mask=self.mask.copy(),
            variance=self.variance.copy(),
            metadata=dict(self.metadata),
        )

    def __repr__(self) -> str:
        return (
            f"Exposure(bbox={self.bbox}, wcs={'yes' if self.wcs is not None else 'no'}, psf={self.psf!r}, "
            f"photo_calib={self.photo_calib}, visit={getattr(self.visit_info, 'visit', None)}, "
            f"detector={getattr(self.visit_info, 'detector', None)})"
        )
