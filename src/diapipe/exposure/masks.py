"""Mask planes: the one place that names mask bits.

Bit numbers follow afw's default order, so a Rubin user reading our MASK HDU
(``MP_<NAME>`` header keywords, as afw writes them) sees familiar planes.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MASK_PLANES", "MASK_DTYPE", "bit", "bits", "any_set", "set_plane", "plane_header", "planes_from_header"]

MASK_DTYPE = np.int32

#: plane name -> bit number
MASK_PLANES: dict[str, int] = {
    "BAD": 0,  # known defect (bad column, dead pixel)
    "SAT": 1,  # saturated, or part of a bleed trail
    "INTRP": 2,  # value interpolated over a defect/saturation/cosmic ray
    "CR": 3,  # cosmic ray
    "EDGE": 4,  # too close to the image edge for detection/measurement
    "DETECTED": 5,  # inside a positive detection footprint
    "DETECTED_NEGATIVE": 6,  # inside a negative detection footprint
    "SUSPECT": 7,  # near saturation / nonlinear
    "NO_DATA": 8,  # no input pixel contributed (warps, coadds, templates)
    "SAT_TEMPLATE": 9,  # saturated in the template (difference images)
    "CLIPPED": 10,  # rejected as an outlier in a coadd input
    "STREAK": 11,  # satellite trail
}


def bit(name: str) -> int:
    """Return the integer value (``1 << n``) of one mask plane."""
    try:
        return 1 << MASK_PLANES[name]
    except KeyError:
        raise KeyError(f"Unknown mask plane {name!r}; known planes: {sorted(MASK_PLANES)}") from None


def bits(names) -> int:
    """Return the OR of the bit values of several planes (a str is one plane)."""
    if isinstance(names, str):
        return bit(names)
    value = 0
    for name in names:
        value |= bit(name)
    return value


def any_set(mask: np.ndarray, names) -> np.ndarray:
    """Boolean array: True where any of ``names`` is set in ``mask``."""
    return (mask & bits(names)) != 0


def set_plane(mask: np.ndarray, where: np.ndarray, name: str) -> None:
    """Set plane ``name`` in ``mask`` (in place) where ``where`` is True."""
    mask[where] |= MASK_DTYPE(bit(name))


def plane_header() -> dict[str, int]:
    """FITS keywords ``MP_<NAME>`` -> bit number, as afw writes them."""
    return {f"MP_{name}": number for name, number in MASK_PLANES.items()}


def planes_from_header(header) -> dict[str, int]:
    """Read ``MP_*`` keywords back; raises if they disagree with ours."""
    found = {key[3:]: int(header[key]) for key in header if key.startswith("MP_")}
    for name, number in found.items():
        if MASK_PLANES.get(name) != number:
            raise ValueError(
                f"Mask plane {name} has bit {number} in the file but {MASK_PLANES.get(name)} in diapipe"
            )
    return found
