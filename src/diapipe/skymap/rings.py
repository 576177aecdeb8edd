"""The DC2 sky map: a "rings" pixelization of the sphere into tracts and patches.

This reproduces the geometry of Rubin's ``lsst.skymap.RingsSkyMap`` (version 1
tract numbering) with the legacy tract builder, so that tract and patch ids,
tract WCSs and pixel boxes are the ones DESC DC2 (and Rubin DP0.2) used:

1. The sphere is cut into ``N = num_rings`` declination rings of height
   :math:`s = \\pi / (N + 1)` plus two polar caps (each half a ring). Ring ``i``
   spans :math:`[s(i + 1/2) - \\pi/2,\\ s(i + 3/2) - \\pi/2]`; its centre line is
   at :math:`\\delta_i = s(i + 1) - \\pi/2`. It is divided in RA into
   :math:`n_i = \\lfloor 2\\pi \\cos(d_i) / s \\rfloor + 1` tracts, ``d_i`` being the
   edge declination closest to the equator (so that neighbours overlap).
2. Tract 0 is the south cap, then ring 0 from ``ra_start`` eastwards, then
   ring 1, ..., and the last id is the north cap. Tract ``k`` of ring ``i`` is
   centred at :math:`(\\alpha_0 + 2\\pi k / n_i, \\delta_i)`.
3. Each tract has a TAN WCS centred on the tract centre with
   ``CD = [[-p, 0], [0, p]]`` (east toward -x, north toward +y). Its pixel box
   holds the four points at angular distance :math:`s/2 + \\text{overlap}` east,
   north, west and south of the centre, is grown to a whole number of
   4000-pixel patches (about the same centre) and shifted to start at (0, 0).
4. Patch ``(x, y)`` has the inner box ``[4000x, 4000x + 3999] x [4000y, 4000y + 3999]``
   and an outer box grown by ``patch_border`` and clipped to the tract; its
   sequential index is ``y * nx + x`` (DC2: 7 x 7 patches, 0..48).

Pixel convention: 0-based, the centre of the first pixel is (0, 0); a box
``(x0, y0, width, height)`` covers pixel centres ``x0 .. x0 + width - 1`` and
the area ``[x0 - 0.5, x0 + width - 0.5]``. WCSs are `astropy.wcs.WCS` objects;
call them with origin 0 (``wcs.wcs_world2pix(ra, dec, 0)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass, field

import numpy as np
from astropy.wcs import WCS

__all__ = ["RingsSkyMapConfig", "RingsSkyMap", "TractInfo", "PatchInfo", "BBox"]

#: ``(x0, y0, width, height)`` in pixels (integer pixel centres, 0-based).
BBox = tuple[int, int, int, int]

# A point further than this from a tract centre is never in the tract (tracts are ~1.5 deg);
# it also keeps us away from the TAN projection's singular hemisphere.
_MAX_TRACT_RADIUS_DEG = 30.0


# --------------------------------------------------------------------------------------------
# small spherical / box helpers
# --------------------------------------------------------------------------------------------
def _unit_vector(ra_rad, dec_rad) -> np.ndarray:
    ra_rad = np.asarray(ra_rad, float)
    dec_rad = np.asarray(dec_rad, float)
    cd = np.cos(dec_rad)
    return np.stack([cd * np.cos(ra_rad), cd * np.sin(ra_rad), np.sin(dec_rad)], axis=-1)


def _offset_point(ra_rad: float, dec_rad: float, bearing_rad: float, dist_rad: float) -> tuple[float, float]:
    """Move (ra, dec) by ``dist`` along a great circle leaving at ``bearing`` (0 = north, pi/2 = east).

    Works at the poles too: there "north" is taken along the meridian of ``ra``.
    """
    p = _unit_vector(ra_rad, dec_rad)
    north = np.array(
        [-math.sin(dec_rad) * math.cos(ra_rad), -math.sin(dec_rad) * math.sin(ra_rad), math.cos(dec_rad)]
    )
    east = np.array([-math.sin(ra_rad), math.cos(ra_rad), 0.0])
    direction = math.cos(bearing_rad) * north + math.sin(bearing_rad) * east
    q = math.cos(dist_rad) * p + math.sin(dist_rad) * direction
    return math.atan2(q[1], q[0]) % (2 * math.pi), math.asin(max(-1.0, min(1.0, q[2])))


def _angular_separation_deg(ra1_deg, dec1_deg, ra2_deg, dec2_deg) -> np.ndarray:
    """Great-circle distance in degrees (haversine; accurate at small separations)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, float)) for v in (ra1_deg, dec1_deg, ra2_deg, dec2_deg))
    h = np.sin(0.5 * (dec2 - dec1)) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin(0.5 * (ra2 - ra1)) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _round_half_up(values) -> np.ndarray:
    """Nearest integer pixel of a position (the pixel whose area contains it)."""
    return np.floor(np.asarray(values, float) + 0.5).astype(np.int64)


def _box_corners(bbox: BBox, shrink: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-edge corners (counter-clockwise from the minimum corner) of a box's area."""
    x0, y0, w, h = bbox
    lo_x, hi_x = x0 - 0.5 + shrink, x0 + w - 0.5 - shrink
    lo_y, hi_y = y0 - 0.5 + shrink, y0 + h - 0.5 - shrink
    return np.array([lo_x, hi_x, hi_x, lo_x]), np.array([lo_y, lo_y, hi_y, hi_y])


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RingsSkyMapConfig:
    """Configuration of a rings sky map; the defaults are DC2's.

    Attributes
    ----------
    num_rings : `int`
        Number of declination rings between the polar caps (DC2: 120).
    projection : `str`
        FITS projection code of the tract WCSs (DC2: ``"TAN"``).
    tract_overlap_deg : `float`
        Minimum overlap of neighbouring tracts on the sky (DC2: 1 arcmin).
    pixel_scale_arcsec : `float`
        Pixel scale at the tract centre (DC2: 0.2).
    patch_inner_dimensions : `tuple` of 2 `int`
        Size (x, y) in pixels of the patch inner regions, which tile the tract.
    patch_border : `int`
        Pixels by which a patch's outer box extends beyond its inner box.
    ra_start_deg : `float`
        RA of the centre of the first tract of each ring.
    """

    num_rings: int = 120
    projection: str = "TAN"
    tract_overlap_deg: float = 1.0 / 60.0
    pixel_scale_arcsec: float = 0.2
    patch_inner_dimensions: tuple[int, int] = (4000, 4000)
    patch_border: int = 100
    ra_start_deg: float = 0.0

    def __post_init__(self):
        dims = tuple(int(d) for d in self.patch_inner_dimensions)
        object.__setattr__(self, "patch_inner_dimensions", dims)
        if int(self.num_rings) <= 0:
            raise ValueError(f"num_rings must be > 0, got {self.num_rings}")
        if len(dims) != 2 or min(dims) <= 0:
            raise ValueError(
                f"patch_inner_dimensions must be two positive ints, got {self.patch_inner_dimensions}"
            )
        if self.patch_border < 0:
            raise ValueError(f"patch_border must be >= 0, got {self.patch_border}")
        if self.pixel_scale_arcsec <= 0:
            raise ValueError(f"pixel_scale_arcsec must be > 0, got {self.pixel_scale_arcsec}")
        if self.tract_overlap_deg < 0:
            raise ValueError(f"tract_overlap_deg must be >= 0, got {self.tract_overlap_deg}")
        if not 0.0 <= self.ra_start_deg < 360.0:
            raise ValueError(f"ra_start_deg must be in [0, 360), got {self.ra_start_deg}")
        if len(self.projection) != 3:
            raise ValueError(f"projection must be a 3-letter FITS code, got {self.projection!r}")

    def to_dict(self) -> dict:
        """Plain-Python dict (JSON/YAML friendly)."""
        out = dataclasses.asdict(self)
        out["patch_inner_dimensions"] = list(self.patch_inner_dimensions)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> RingsSkyMapConfig:
        """Inverse of `to_dict`; unknown keys are an error (catches typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown RingsSkyMapConfig keys {sorted(unknown)}; known: {sorted(known)}")
        kwargs = dict(data)
        if "patch_inner_dimensions" in kwargs:
            kwargs["patch_inner_dimensions"] = tuple(kwargs["patch_inner_dimensions"])
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# patches and tracts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PatchInfo:
    """One patch of a tract: boxes in tract pixel coordinates and the (shared) tract WCS."""

    index: int
    index_xy: tuple[int, int]
    inner_bbox: BBox
    outer_bbox: BBox
    wcs: WCS = field(repr=False)
    tract_id: int = -1

    @property
    def inner_vertices_radec(self) -> np.ndarray:
        """(4, 2) array of (ra, dec) degrees: the corners of the inner region's pixel area."""
        x, y = _box_corners(self.inner_bbox)
        return np.column_stack(self.wcs.wcs_pix2world(x, y, 0))

    @property
    def outer_vertices_radec(self) -> np.ndarray:
        """(4, 2) array of (ra, dec) degrees: the corners of the outer region's pixel area."""
        x, y = _box_corners(self.outer_bbox)
        return np.column_stack(self.wcs.wcs_pix2world(x, y, 0))

    @property
    def inner_center_radec(self) -> tuple[float, float]:
        """(ra, dec) degrees of the centre of the inner box."""
        x0, y0, w, h = self.inner_bbox
        ra, dec = self.wcs.wcs_pix2world([x0 + 0.5 * (w - 1)], [y0 + 0.5 * (h - 1)], 0)
        return float(ra[0]), float(dec[0])

    def __eq__(self, other) -> bool:
        if not isinstance(other, PatchInfo):
            return NotImplemented
        return (self.tract_id, self.index, self.outer_bbox) == (other.tract_id, other.index, other.outer_bbox)

    def __hash__(self) -> int:
        return hash((self.tract_id, self.index))


class TractInfo:
    """One tract: its centre, TAN WCS, pixel box and patch grid.

    Built by `RingsSkyMap`; see the module docstring for the geometry.
    """

    def __init__(
        self,
        tract_id: int,
        ctr_ra_deg: float,
        ctr_dec_deg: float,
        radius_deg: float,
        config: RingsSkyMapConfig,
    ):
        self.tract_id = int(tract_id)
        self.ctr_ra_deg = float(ctr_ra_deg)
        self.ctr_dec_deg = float(ctr_dec_deg)
        self.radius_deg = float(radius_deg)
        self.patch_inner_dimensions = config.patch_inner_dimensions
        self.patch_border = int(config.patch_border)
        self.tract_overlap_deg = float(config.tract_overlap_deg)

        scale_deg = config.pixel_scale_arcsec / 3600.0
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = [f"RA---{config.projection}", f"DEC--{config.projection}"]
        wcs.wcs.crval = [self.ctr_ra_deg, self.ctr_dec_deg]
        wcs.wcs.crpix = [1.0, 1.0]  # the centre is pixel (0, 0) until the box is known
        wcs.wcs.cd = np.array([[-scale_deg, 0.0], [0.0, scale_deg]])
        wcs.wcs.radesys = "ICRS"
        wcs.wcs.set()

        # Minimum box: the four points radius + overlap east, north, west, south of the centre.
        dist = math.radians(self.radius_deg + self.tract_overlap_deg)
        ra0, dec0 = math.radians(self.ctr_ra_deg), math.radians(self.ctr_dec_deg)
        pts = [_offset_point(ra0, dec0, k * math.pi / 2, dist) for k in range(4)]
        px, py = wcs.wcs_world2pix(np.degrees([p[0] for p in pts]), np.degrees([p[1] for p in pts]), 0)
        lo = _round_half_up([px.min(), py.min()])
        hi = np.ceil(np.array([px.max(), py.max()]) - 0.5).astype(np.int64)
        dims = hi - lo + 1

        # Grow to whole patches, keeping the centre, then shift so the box starts at 0.
        num = []
        for i, inner in enumerate(self.patch_inner_dimensions):
            n = int(-(-dims[i] // inner))
            delta = inner * n - int(dims[i])
            lo[i] -= delta // 2
            dims[i] = inner * n
            num.append(n)
        self.num_patches: tuple[int, int] = (num[0], num[1])
        self.bbox: BBox = (0, 0, int(dims[0]), int(dims[1]))
        wcs.wcs.crpix = [1.0 - float(lo[0]), 1.0 - float(lo[1])]
        wcs.wcs.set()
        self.wcs: WCS = wcs
        self._patches: dict[int, PatchInfo] = {}

    # -- geometry ---------------------------------------------------------------------
    @property
    def vertices_radec(self) -> np.ndarray:
        """(4, 2) (ra, dec) degrees: corners of the tract's inner region.

        As Rubin's ExplicitTractInfo: the corners of the pixel box's area shrunk
        by 0.001 px (so the vertices are inside the tract), counter-clockwise in
        pixel space from the (x min, y min) corner.
        """
        x, y = _box_corners(self.bbox, shrink=0.001)
        return np.column_stack(self.wcs.wcs_pix2world(x, y, 0))

    def sky_to_pixel(self, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
        """Tract pixel coordinates (x, y) of sky positions; NaN when far off the tract."""
        ra = np.atleast_1d(np.asarray(ra_deg, float))
        dec = np.atleast_1d(np.asarray(dec_deg, float))
        near = _angular_separation_deg(ra, dec, self.ctr_ra_deg, self.ctr_dec_deg) < _MAX_TRACT_RADIUS_DEG
        x = np.full(ra.shape, np.nan)
        y = np.full(ra.shape, np.nan)
        if near.any():
            x[near], y[near] = self.wcs.wcs_world2pix(ra[near], dec[near], 0)
        return x, y

    def contains(self, ra_deg, dec_deg):
        """True where (ra, dec) falls in a pixel of the tract box (scalar in, bool out)."""
        x, y = self.sky_to_pixel(ra_deg, dec_deg)
        good = np.isfinite(x) & np.isfinite(y)
        ix = _round_half_up(np.where(good, x, -1))
        iy = _round_half_up(np.where(good, y, -1))
        _, _, w, h = self.bbox
        inside = good & (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
        return bool(inside[0]) if np.ndim(ra_deg) == 0 else inside

    # -- patches ----------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_patches[0] * self.num_patches[1]

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index) -> PatchInfo:
        """Patch by sequential index (``y * nx + x``) or by ``(x, y)``."""
        nx, ny = self.num_patches
        if isinstance(index, (int, np.integer)):
            if not 0 <= index < nx * ny:
                raise LookupError(
                    f"Patch index {index} is not in tract {self.tract_id}'s range 0..{nx * ny - 1}"
                )
            seq = int(index)
        else:
            try:
                ix, iy = (int(v) for v in index)
            except (TypeError, ValueError) as err:
                raise LookupError(f"Patch index {index!r} is neither an int nor an (x, y) pair") from err
            if not (0 <= ix < nx and 0 <= iy < ny):
                raise LookupError(
                    f"Patch index {(ix, iy)} is not in tract {self.tract_id}'s range "
                    f"x 0..{nx - 1}, y 0..{ny - 1}"
                )
            seq = iy * nx + ix
        patch = self._patches.get(seq)
        if patch is None:
            patch = self._make_patch(seq)
            self._patches[seq] = patch
        return patch

    def _make_patch(self, seq: int) -> PatchInfo:
        nx = self.num_patches[0]
        ix, iy = seq % nx, seq // nx
        wx, wy = self.patch_inner_dimensions
        inner = (ix * wx, iy * wy, wx, wy)
        b = self.patch_border
        _, _, tw, th = self.bbox
        ox0, oy0 = max(inner[0] - b, 0), max(inner[1] - b, 0)
        ox1, oy1 = min(inner[0] + wx - 1 + b, tw - 1), min(inner[1] + wy - 1 + b, th - 1)
        outer = (ox0, oy0, ox1 - ox0 + 1, oy1 - oy0 + 1)
        return PatchInfo(seq, (ix, iy), inner, outer, self.wcs, self.tract_id)

    def find_patch(self, ra_deg: float, dec_deg: float) -> PatchInfo:
        """The patch whose inner box contains (ra, dec); `LookupError` if off the tract."""
        x, y = self.sky_to_pixel(ra_deg, dec_deg)
        if not (np.isfinite(x[0]) and np.isfinite(y[0])):
            raise LookupError(f"({ra_deg}, {dec_deg}) is too far from tract {self.tract_id} to project")
        ix, iy = int(_round_half_up(x[0])), int(_round_half_up(y[0]))
        _, _, w, h = self.bbox
        if not (0 <= ix < w and 0 <= iy < h):
            raise LookupError(
                f"({ra_deg}, {dec_deg}) -> pixel ({x[0]:.1f}, {y[0]:.1f}) is not in tract "
                f"{self.tract_id} (box 0..{w - 1} x 0..{h - 1})"
            )
        return self[(ix // self.patch_inner_dimensions[0], iy // self.patch_inner_dimensions[1])]

    def find_patch_list(self, ra_list, dec_list) -> list[PatchInfo]:
        """Patches that overlap (or may overlap) the region spanned by sky points.

        The pixel bounding box of the points, grown by ``patch_border`` and
        clipped to the tract, selects patches by their inner boxes (as Rubin:
        a naive box test, so a rotated region may pick up extra corner patches).
        Returns ``[]`` when the region misses the tract; sorted by index.
        """
        x, y = self.sky_to_pixel(ra_list, dec_list)
        good = np.isfinite(x) & np.isfinite(y)
        if not good.any():
            return []
        b = self.patch_border
        _, _, w, h = self.bbox
        x0 = max(int(_round_half_up(x[good].min())) - b, 0)
        y0 = max(int(_round_half_up(y[good].min())) - b, 0)
        x1 = min(int(np.ceil(x[good].max() - 0.5)) + b, w - 1)
        y1 = min(int(np.ceil(y[good].max() - 0.5)) + b, h - 1)
        if x1 < x0 or y1 < y0:
            return []
        wx, wy = self.patch_inner_dimensions
        return [
            self[(ix, iy)]
            for iy in range(y0 // wy, y1 // wy + 1)
            for ix in range(x0 // wx, x1 // wx + 1)
        ]

    def __repr__(self) -> str:
        return f"TractInfo(id={self.tract_id}, ctr=({self.ctr_ra_deg:.6f}, {self.ctr_dec_deg:.6f}))"


# --------------------------------------------------------------------------------------------
# the sky map
# --------------------------------------------------------------------------------------------
class RingsSkyMap:
    """Rubin's rings sky map (tract numbering version 1), DC2 configuration by default.

    Parameters
    ----------
    config : `RingsSkyMapConfig`, optional
        Geometry; default DC2's.
    name : `str`
        Name under which the sky map is registered in a butler (``"DC2"``).

    Examples
    --------
    >>> skymap = RingsSkyMap()
    >>> len(skymap)
    18938
    >>> tract = skymap.find_tract(55.745834, -32.269167)
    >>> tract.tract_id, tract.find_patch(55.745834, -32.269167).index
    (4431, 17)
    """

    def __init__(self, config: RingsSkyMapConfig | None = None, name: str = "DC2"):
        self.config = config if config is not None else RingsSkyMapConfig()
        self.name = str(name)
        n = self.config.num_rings
        self._ring_size = math.pi / (n + 1)
        counts = []
        for i in range(n):
            start = self._ring_size * (i + 0.5) - 0.5 * math.pi
            stop = start + self._ring_size
            d = min(abs(start), abs(stop))
            counts.append(int(2 * math.pi * math.cos(d) / self._ring_size) + 1)
        self._ring_counts = np.array(counts, dtype=np.int64)
        # first tract id of each ring (tract 0 is the south cap)
        self._ring_first = 1 + np.concatenate([[0], np.cumsum(self._ring_counts)[:-1]])
        self._num_tracts = int(self._ring_counts.sum()) + 2
        self._tracts: dict[int, TractInfo] = {}

    # -- structure --------------------------------------------------------------------
    @property
    def ring_size_deg(self) -> float:
        """Declination height of a ring (degrees)."""
        return math.degrees(self._ring_size)

    @property
    def ring_counts(self) -> np.ndarray:
        """Number of tracts in each ring, south to north (copy)."""
        return self._ring_counts.copy()

    def __len__(self) -> int:
        return self._num_tracts

    def __iter__(self):
        for tract_id in range(self._num_tracts):
            yield self[tract_id]

    def ring_indices(self, tract_id: int) -> tuple[int, int]:
        """(ring, index within ring); ring -1 / ``num_rings`` are the south / north caps."""
        if not isinstance(tract_id, (int, np.integer)) or not 0 <= tract_id < self._num_tracts:
            raise LookupError(
                f"Tract id {tract_id!r} is not in sky map {self.name!r}'s range 0..{self._num_tracts - 1}"
            )
        if tract_id == 0:
            return -1, 0
        if tract_id == self._num_tracts - 1:
            return self.config.num_rings, 0
        ring = int(np.searchsorted(self._ring_first, tract_id, side="right") - 1)
        return ring, int(tract_id - self._ring_first[ring])

    def tract_center(self, tract_id: int) -> tuple[float, float]:
        """(ra, dec) degrees of a tract's centre (cheap; no WCS built)."""
        ring, k = self.ring_indices(tract_id)
        if ring == -1:
            return 0.0, -90.0
        if ring == self.config.num_rings:
            return 0.0, 90.0
        dec = math.degrees(self._ring_size * (ring + 1) - 0.5 * math.pi)
        ra = (math.degrees(2 * math.pi * k / self._ring_counts[ring]) + self.config.ra_start_deg) % 360.0
        return ra, dec

    def __getitem__(self, tract_id: int) -> TractInfo:
        """The tract with this id (built on first use, then cached)."""
        tract = self._tracts.get(tract_id)
        if tract is None:
            ra, dec = self.tract_center(tract_id)
            tract = TractInfo(int(tract_id), ra, dec, 0.5 * self.ring_size_deg, self.config)
            self._tracts[int(tract_id)] = tract
        return tract

    # -- lookups ----------------------------------------------------------------------
    def _ring_of(self, dec_deg: np.ndarray) -> np.ndarray:
        first_start = 0.5 * self._ring_size - 0.5 * math.pi
        dec = np.radians(dec_deg)
        ring = np.floor((dec - first_start) / self._ring_size).astype(np.int64)
        ring[dec < first_start] = -1
        ring[dec > -first_start] = self.config.num_rings
        return np.clip(ring, -1, self.config.num_rings)

    def _tract_in_ring(self, ra_deg: np.ndarray, ring: np.ndarray) -> np.ndarray:
        n = self._ring_counts[np.clip(ring, 0, self.config.num_rings - 1)]
        delta = np.radians((np.asarray(ra_deg, float) - self.config.ra_start_deg) % 360.0)
        k = np.floor(delta / (2 * math.pi / n) + 0.5).astype(np.int64)
        return np.where(k >= n, 0, k)

    def find_tract_ids(self, ra_deg, dec_deg) -> np.ndarray:
        """Vectorised `find_tract`: tract ids (int64 array) for arrays of degrees."""
        ra = np.atleast_1d(np.asarray(ra_deg, float))
        dec = np.atleast_1d(np.asarray(dec_deg, float))
        if ra.shape != dec.shape:
            raise ValueError(f"ra_deg shape {ra.shape} != dec_deg shape {dec.shape}")
        ring = self._ring_of(dec)
        k = self._tract_in_ring(ra, ring)
        ids = self._ring_first[np.clip(ring, 0, self.config.num_rings - 1)] + k
        ids = np.where(ring == -1, 0, ids)
        return np.where(ring == self.config.num_rings, self._num_tracts - 1, ids)

    def find_tract(self, ra_deg: float, dec_deg: float) -> TractInfo:
        """The tract whose centre is nearest (ra, dec), as Rubin's RingsSkyMap.findTract.

        The ring is the one whose declination band holds the point; within it, the
        tract with the nearest centre RA (tracts overlap, so the point is inside it).
        """
        return self[int(self.find_tract_ids(ra_deg, dec_deg)[0])]

    def find_all_tracts(self, ra_deg: float, dec_deg: float) -> list[TractInfo]:
        """All tracts whose pixel box contains (ra, dec) (neighbours overlap by >= 1 arcmin)."""
        ring0 = int(self._ring_of(np.atleast_1d(float(dec_deg)))[0])
        found = []
        for ring in (ring0 - 1, ring0, ring0 + 1):
            if not 0 <= ring < self.config.num_rings:
                continue
            k0 = int(self._tract_in_ring(np.atleast_1d(float(ra_deg)), np.atleast_1d(ring))[0])
            n = int(self._ring_counts[ring])
            for k in {(k0 - 1) % n, k0, (k0 + 1) % n}:
                tract = self[int(self._ring_first[ring] + k)]
                if tract.contains(ra_deg, dec_deg):
                    found.append(tract)
        for cap in (0, self._num_tracts - 1):
            if self[cap].contains(ra_deg, dec_deg):
                found.append(self[cap])
        return sorted(found, key=lambda t: t.tract_id)

    def find_tract_patch_list(self, ra_list, dec_list) -> list[tuple[TractInfo, list[PatchInfo]]]:
        """Tracts and patches overlapping the region spanned by sky points (e.g. detector corners).

        For every tract containing any of the points, the patches overlapping the
        points' pixel bounding box (see `TractInfo.find_patch_list`). Sorted by tract id.
        """
        ra = np.atleast_1d(np.asarray(ra_list, float))
        dec = np.atleast_1d(np.asarray(dec_list, float))
        if ra.shape != dec.shape or ra.ndim != 1 or ra.size == 0:
            raise ValueError(
                f"ra_list/dec_list must be equal-length 1-d sequences, got {ra.shape}, {dec.shape}"
            )
        tracts: dict[int, TractInfo] = {}
        for r, d in zip(ra, dec, strict=True):
            for tract in self.find_all_tracts(r, d):
                tracts[tract.tract_id] = tract
        out = []
        for tract_id in sorted(tracts):
            patches = tracts[tract_id].find_patch_list(ra, dec)
            if patches:
                out.append((tracts[tract_id], patches))
        return out

    # -- identity ---------------------------------------------------------------------
    def skymap_hash(self) -> bytes:
        """SHA-1 (20 bytes) of the geometry, packed as Rubin packs a legacy-builder RingsSkyMap.

        Rubin hashes the class name, then ``<iiidd3sd`` (patch inner x, y, border,
        tract overlap, pixel scale, projection, rotation = 0) and ``<id`` (num
        rings, RA start); we hash the same bytes, so the value should equal the
        hash Rubin registered for the DC2 sky map.
        """
        c = self.config
        sha1 = hashlib.sha1()
        sha1.update(b"RingsSkyMap")
        sha1.update(
            struct.pack(
                "<iiidd3sd",
                c.patch_inner_dimensions[0],
                c.patch_inner_dimensions[1],
                c.patch_border,
                c.tract_overlap_deg,
                c.pixel_scale_arcsec,
                c.projection.encode("ascii"),
                0.0,
            )
        )
        sha1.update(struct.pack("<id", c.num_rings, c.ra_start_deg))
        return sha1.digest()

    def __repr__(self) -> str:
        return f"RingsSkyMap(name={self.name!r}, tracts={len(self)}, config={self.config})"
