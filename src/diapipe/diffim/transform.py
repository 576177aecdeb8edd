"""DiaSource catalogue -> the APDB ``DiaSource`` table (lsst-sdm-schemas ``apdb.yaml``).

`dia_source_table` is the pure core of ``transformDiaSrcCat``: it takes the
catalogue written by ``detectAndMeasure`` (``goodSeeingDiff_diaSrc``, already
calibrated: fluxes in nJy, positions in degrees, moments in arcsec²), removes
the sky sources, adds the per-visit columns (``visit``, ``detector``, ``band``,
``midpointMjdTai``, ``exposureTime``, ``timeProcessedMjdTai``) and returns a
`pandas.DataFrame` whose columns are exactly the schema's, in schema order,
with the schema's types (``long`` -> int64, ``int`` -> int32, ``short`` ->
int16, ``double`` -> float64, ``float`` -> float32, ``boolean`` -> bool,
``char``/``string`` -> str). The schema is read from the installed
lsst-sdm-schemas package, so the table follows the APDB it is written to.

Values for what diapipe does not measure
----------------------------------------
Nullable float columns that no diapipe algorithm fills (trailed-source fit,
``reliability``, ``extendedness``, withdrawal and reassociation times) are NaN
(NULL); flags of those algorithms are False. ``diaObjectId``, ``ssObjectId``
and ``parentDiaSourceId`` are 0, Rubin's convention for "not associated yet /
no solar-system object / no deblend parent" (association fills diaObjectId).
NOT NULL counts of unmeasured fits (``trailNdata``, ``dipoleNdata`` of
non-dipoles) are 0.

DiaSource ids
-------------
``diaSourceId = (visit << 28) | (detector << 20) | counter`` with ``counter``
in 1 .. 2**20 - 1 (unique per detector-visit, 0 never used), ``detector`` <
256 and ``visit`` < 2**35: unique over a whole survey, readable back with
`unpack_dia_source_id`, and stable between ``goodSeeingDiff_diaSrc`` (column
``id``) and the table (``diaSourceId``).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

__all__ = [
    "COUNTER_BITS",
    "DETECTOR_BITS",
    "dia_source_schema",
    "dia_source_table",
    "pack_dia_source_id",
    "unpack_dia_source_id",
]

COUNTER_BITS = 20
DETECTOR_BITS = 8
VISIT_BITS = 63 - COUNTER_BITS - DETECTOR_BITS

_DTYPES = {
    "long": np.int64,
    "int": np.int32,
    "short": np.int16,
    "double": np.float64,
    "float": np.float32,
    "boolean": np.bool_,
    "char": object,
    "string": object,
}

#: Columns filled from the visit, not from the catalogue.
_VISIT_COLUMNS = ("diaSourceId", "visit", "detector", "band", "midpointMjdTai", "exposureTime", "timeProcessedMjdTai")
#: Nullable ids that are 0 until association (Rubin's convention).
_ZERO_IDS = ("diaObjectId", "ssObjectId", "parentDiaSourceId")


@functools.cache
def dia_source_schema() -> tuple[dict, ...]:
    """The ``DiaSource`` columns of the installed ``apdb.yaml``: dicts with
    ``name``, ``datatype``, ``nullable``, ``unit`` (``fits:tunit`` or None), in schema order."""
    from ..apdb.schema import apdb_schema_path, apdb_schema_tables

    tables = apdb_schema_tables()
    if "DiaSource" not in tables:
        raise KeyError(f"no DiaSource table in {apdb_schema_path()}")
    return tuple(
        {
            "name": c["name"],
            "datatype": c["datatype"],
            "nullable": bool(c.get("nullable", True)),
            "unit": c.get("fits:tunit"),
        }
        for c in tables["DiaSource"]
    )


def pack_dia_source_id(visit: int, detector: int, counter) -> np.ndarray:
    """``(visit << 28) | (detector << 20) | counter`` (see the module docstring).

    >>> int(pack_dia_source_id(960220, 33, 5)[0])
    257757128163333
    >>> unpack_dia_source_id(257757128163333)
    (960220, 33, 5)
    """
    counter = np.atleast_1d(np.asarray(counter, np.int64))
    if not 0 <= int(detector) < 2**DETECTOR_BITS:
        raise ValueError(f"detector {detector} does not fit in {DETECTOR_BITS} bits of a diaSourceId")
    if not 0 <= int(visit) < 2**VISIT_BITS:
        raise ValueError(f"visit {visit} does not fit in {VISIT_BITS} bits of a diaSourceId")
    if counter.size and (counter.min() < 1 or counter.max() >= 2**COUNTER_BITS):
        raise ValueError(
            f"visit {visit} detector {detector}: {counter.max()} DiaSources exceed the "
            f"{2**COUNTER_BITS - 1} a diaSourceId can number"
        )
    return (np.int64(visit) << (COUNTER_BITS + DETECTOR_BITS)) | (np.int64(detector) << COUNTER_BITS) | counter


def unpack_dia_source_id(dia_source_id) -> tuple:
    """Inverse of `pack_dia_source_id`: ``(visit, detector, counter)`` (ints or arrays)."""
    ids = np.asarray(dia_source_id, np.int64)
    visit = ids >> (COUNTER_BITS + DETECTOR_BITS)
    detector = (ids >> COUNTER_BITS) & (2**DETECTOR_BITS - 1)
    counter = ids & (2**COUNTER_BITS - 1)
    if ids.ndim == 0:
        return int(visit), int(detector), int(counter)
    return visit, detector, counter


def _column(catalog, name, n):
    if catalog is None or name not in catalog.colnames:
        return None
    values = np.asarray(catalog[name])
    if len(values) != n:
        raise ValueError(f"column {name} has {len(values)} rows, expected {n}")
    return values


def dia_source_table(
    catalog,
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint_mjd_tai: float,
    exposure_time_s: float | None = None,
    time_processed_mjd_tai: float | None = None,
    remove_sky_sources: bool = True,
) -> pd.DataFrame:
    """The APDB ``DiaSource`` rows of one detector-visit.

    Parameters
    ----------
    catalog : `astropy.table.Table`
        ``goodSeeingDiff_diaSrc``: column ``id`` (packed diaSourceId), ``sky_source``
        and any schema column (same name and unit); other columns are ignored.
    visit, detector : `int`
    band : `str`
    midpoint_mjd_tai : `float`
        Visit midpoint (TAI MJD).
    exposure_time_s : `float`, optional
    time_processed_mjd_tai : `float`, optional
        Default: now.
    remove_sky_sources : `bool`
        Drop rows with ``sky_source`` (they monitor noise; they are not DiaSources).

    Returns
    -------
    table : `pandas.DataFrame`
        Exactly the schema's columns, in order, with the schema's types.

    Raises
    ------
    ValueError
        A NOT NULL column would hold NaN, or ids do not belong to (visit, detector).
    """
    if remove_sky_sources and catalog is not None and "sky_source" in catalog.colnames and len(catalog):
        catalog = catalog[~np.asarray(catalog["sky_source"], bool)]
    n = 0 if catalog is None else len(catalog)
    if time_processed_mjd_tai is None:
        from astropy.time import Time

        time_processed_mjd_tai = float(Time.now().tai.mjd)
    ids = _column(catalog, "id", n)
    if ids is None:
        ids = pack_dia_source_id(visit, detector, np.arange(1, n + 1))
    ids = np.asarray(ids, np.int64)
    if n:
        id_visit, id_detector, _ = unpack_dia_source_id(ids)
        if np.any(id_visit != visit) or np.any(id_detector != detector):
            raise ValueError(f"diaSourceIds of the catalogue do not belong to visit {visit} detector {detector}")
    per_visit = {
        "diaSourceId": ids,
        "visit": np.full(n, visit),
        "detector": np.full(n, detector),
        "band": np.full(n, band, dtype=object),
        "midpointMjdTai": np.full(n, midpoint_mjd_tai),
        "exposureTime": np.full(n, np.nan if exposure_time_s is None else exposure_time_s),
        "timeProcessedMjdTai": np.full(n, time_processed_mjd_tai),
    }
    data = {}
    for column in dia_source_schema():
        name, datatype = column["name"], column["datatype"]
        dtype = _DTYPES[datatype]
        if name in per_visit:
            values = per_visit[name]
        else:
            values = _column(catalog, name, n)
        if values is None:
            if name in _ZERO_IDS or datatype in ("long", "int", "short"):
                values = np.zeros(n, dtype)
            elif datatype == "boolean":
                values = np.zeros(n, bool)
            elif dtype is object:
                values = np.full(n, None, dtype=object)
            else:
                values = np.full(n, np.nan)
        if dtype is object:
            series = pd.Series(np.asarray(values, dtype=object), dtype=object)
        else:
            values = np.asarray(values)
            if not column["nullable"] and values.dtype.kind == "f" and not np.isfinite(values).all():
                raise ValueError(
                    f"NOT NULL column {name} of visit {visit} detector {detector} has "
                    f"{int((~np.isfinite(values)).sum())} non-finite values"
                )
            series = pd.Series(values.astype(dtype))
        data[name] = series
    table = pd.DataFrame(data, columns=[c["name"] for c in dia_source_schema()])
    return table
