"""Alert packets in the lsst-alert-packet Avro schema, with FITS cutouts.

Schema version
--------------
``ALERT_SCHEMA_VERSION = "11.1"``: the newest schema shipped by the installed
lsst-alert-packet whose diaSource/diaObject/diaForcedSource records are the
APDB 10.0.0 tables (sdm_schemas 10.0.0) minus database-only columns: every
field of 11.1 is an APDB 10.0.0 column with the same name; the only APDB
columns absent are ``DiaSource.ssObjectReassocTimeMjdTai`` and
``DiaObject.validityEndMjdTai`` (database bookkeeping). 11.0 and 10.0 lack five
DiaSource columns that APDB 10.0.0 has (``exposureTime``, ``trail_flag``,
``trailAlgorithm``, ``reliabilityVersion``...), so 11.1 is the match.

Packets are plain dicts; `validate_packet` checks them with fastavro *and*
checks the exact field names recursively (fastavro's validation silently
ignores keys that the schema does not know, so a misspelt optional field would
otherwise be dropped without a word).

Cutouts are FITS files as bytes: the image in the primary HDU (EXTNAME IMAGE,
WCS in its header), then VARIANCE (same WCS), optional MASK, and PSF (the
kernel image at the source position). Pixels off the parent image are NaN in
IMAGE and VARIANCE (MASK gets NO_DATA), so every cutout has the same size.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterable, Mapping
from importlib import resources

import fastavro
import numpy as np
import pandas as pd
from astropy.io import fits
from astropy.wcs import WCS, Sip

from ..exposure.masks import MASK_DTYPE, bit, plane_header

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "PREVIOUS_WINDOW_DAYS",
    "AlertValidationError",
    "load_alert_schema",
    "make_cutout",
    "build_alert_packet",
    "record_from_row",
    "validate_packet",
    "write_alerts",
    "read_alerts",
]

ALERT_SCHEMA_VERSION = "11.1"
#: History in a packet: 12 months of 30 days, as Rubin's loader.
PREVIOUS_WINDOW_DAYS = 360.0


class AlertValidationError(ValueError):
    """A packet does not follow the alert schema; the message names the field."""


# -- schema -----------------------------------------------------------------


@functools.cache
def _schema_cached(version: str) -> dict:
    major, minor = version.split(".")
    name = f"lsst.v{major}_{minor}.alert.avsc"
    path = resources.files("lsst.alert.packet").joinpath("schema", major, minor, name)
    if not path.is_file():
        raise FileNotFoundError(f"lsst-alert-packet has no schema version {version} ({path})")
    with resources.as_file(path) as local:
        return fastavro.schema.load_schema(os.fspath(local))


def load_alert_schema(version: str = ALERT_SCHEMA_VERSION) -> dict:
    """The parsed (fastavro) alert schema of a given ``major.minor`` version."""
    return _schema_cached(version)


#: id(schema) -> (schema, named types, fastavro-parsed schema); the schema object is kept so
#: that its id is not reused. Walking and parsing the schema cost ~20 ms per packet otherwise.
_SCHEMA_INFO: dict[int, tuple] = {}


def _schema_info(schema) -> tuple:
    entry = _SCHEMA_INFO.get(id(schema))
    if entry is None or entry[0] is not schema:
        if len(_SCHEMA_INFO) >= 8:
            _SCHEMA_INFO.pop(next(iter(_SCHEMA_INFO)))
        entry = (schema, _walk_named_types(schema), fastavro.parse_schema(schema))
        _SCHEMA_INFO[id(schema)] = entry
    return entry


def _named_types(schema) -> dict[str, dict]:
    """All named record definitions inside a (parsed) schema, by full name (cached per schema
    object; do not modify the result)."""
    return _schema_info(schema)[1]


def _walk_named_types(schema) -> dict[str, dict]:
    found: dict[str, dict] = {}

    def walk(node, namespace=None):
        if isinstance(node, list):
            for item in node:
                walk(item, namespace)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind == "record":
                name = node["name"]
                ns = node.get("namespace", namespace)
                full = name if "." in name or ns is None else f"{ns}.{name}"
                found.setdefault(full, node)
                found.setdefault(name, node)
                for field in node["fields"]:
                    walk(field["type"], ns)
            elif kind == "array":
                walk(node["items"], namespace)
            elif kind == "map":
                walk(node["values"], namespace)
            elif isinstance(kind, (dict, list)):
                walk(kind, namespace)

    walk(schema)
    return found


def _record_schema(schema: dict, name: str) -> dict:
    types = _named_types(schema)
    for key, node in types.items():
        if key == name or key.endswith("." + name):
            return node
    raise KeyError(f"alert schema has no record {name!r}")


# -- rows -> records -------------------------------------------------------------


def _branch(ftype):
    """(nullable, non-null type) of a field type."""
    if isinstance(ftype, list):
        others = [t for t in ftype if t != "null"]
        return "null" in ftype, others[0] if len(others) == 1 else others
    return False, ftype


def _is_null(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    if isinstance(value, (float, np.floating)) and math.isnan(value):
        return True
    return False


def _convert(value, avro_type, field: str):
    if avro_type in ("long", "int"):
        if isinstance(value, (bool, np.bool_)):
            return int(value)
        f = float(value)
        if not f.is_integer():
            raise AlertValidationError(f"field {field!r}: {value!r} is not an integer")
        return int(value)
    if avro_type in ("float", "double"):
        return float(value)
    if avro_type == "boolean":
        return bool(value)
    if avro_type == "string":
        return str(value)
    if avro_type == "bytes":
        return bytes(value)
    return value


def record_from_row(row, record_schema: dict, *, what: str = "row") -> dict:
    """Convert one table row (mapping / Series) to a record of ``record_schema``.

    Columns the record lacks are dropped (e.g. APDB bookkeeping columns);
    fields the row lacks, or holds NaN for, become null when nullable; a
    missing required field raises `AlertValidationError` naming it.
    """
    if isinstance(row, pd.Series):
        row = row.to_dict()
    out = {}
    for field in record_schema["fields"]:
        name = field["name"]
        nullable, avro_type = _branch(field["type"])
        value = row.get(name, None)
        if _is_null(value):
            if not nullable:
                raise AlertValidationError(f"{what}: required field {name!r} is missing or null")
            out[name] = None
            continue
        out[name] = _convert(value, avro_type, f"{what}.{name}")
    return out


def _records(table, record_schema, what):
    if table is None:
        return None
    if isinstance(table, pd.DataFrame):
        rows = table.to_dict(orient="records")
    else:
        rows = list(table)
    return [record_from_row(r, record_schema, what=f"{what}[{i}]") for i, r in enumerate(rows)]


# -- cutouts ------------------------------------------------------------------


def _shifted_wcs(wcs: WCS, x_start: int, y_start: int) -> WCS:
    """WCS of a sub-image whose pixel [0, 0] is parent pixel (x_start, y_start)."""
    out = wcs.deepcopy()
    out.wcs.crpix = out.wcs.crpix - np.array([x_start, y_start], dtype=float)
    if out.sip is not None:
        crpix = out.wcs.crpix
        out.sip = Sip(out.sip.a, out.sip.b, out.sip.ap, out.sip.bp, crpix)
    return out


def make_cutout(
    image,
    variance,
    wcs: WCS,
    psf_image,
    x: float,
    y: float,
    *,
    size: int = 31,
    mask=None,
    xy0=(0, 0),
    bunit: str = "nJy",
    flux_scale: float = 1.0,
) -> bytes:
    """A FITS cutout (bytes) of ``size`` x ``size`` pixels centred on (x, y).

    Parameters
    ----------
    image, variance : `numpy.ndarray`
        Parent image and variance, indexed ``[y, x]``.
    wcs : `astropy.wcs.WCS`
        WCS of the parent image (0-based pixel calls on ``image``'s array
        after ``xy0``: ``wcs`` maps parent coordinates).
    psf_image : `numpy.ndarray` or object with ``compute_kernel_image(x, y)``
        PSF kernel stored in the PSF HDU.
    x, y : `float`
        Source position in parent pixel coordinates; the cutout centre pixel
        is ``round(x), round(y)``.
    size : `int`
        Odd size in pixels (>= 30 as the alert requirements ask: 31 default).
    mask : `numpy.ndarray`, optional
        Parent mask plane, stored as a MASK HDU (NO_DATA off the image).
    xy0 : (int, int)
        Parent coordinates of ``image[0, 0]``.
    bunit : `str`
        Pixel unit written to BUNIT.
    flux_scale : `float`
        Factor from ``image``'s units to ``bunit`` (variance scaled by its square):
        an instrumental-unit calexp is converted on the cutout, not the whole frame.
    """
    if size < 30 or size % 2 == 0:
        raise ValueError(f"cutout size must be odd and >= 30 pixels, got {size}")
    image = np.asarray(image)
    variance = np.asarray(variance)
    if variance.shape != image.shape:
        raise ValueError(f"variance {variance.shape} does not match image {image.shape}")
    half = size // 2
    cx, cy = int(np.round(x)), int(np.round(y))
    x_start, y_start = cx - half, cy - half  # parent coordinates of cutout [0, 0]
    lx, ly = x_start - xy0[0], y_start - xy0[1]
    ny, nx = image.shape
    sx0, sy0, sx1, sy1 = max(lx, 0), max(ly, 0), min(lx + size, nx), min(ly + size, ny)

    def cut(arr, fill, dtype):
        out = np.full((size, size), fill, dtype=dtype)
        if sx0 < sx1 and sy0 < sy1:
            out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = arr[sy0:sy1, sx0:sx1]
        return out

    img = cut(image, np.nan, np.float32)
    var = cut(variance, np.nan, np.float32)
    if flux_scale != 1.0:
        img *= np.float32(flux_scale)
        var *= np.float32(flux_scale * flux_scale)
    m = None if mask is None else cut(np.asarray(mask), bit("NO_DATA"), MASK_DTYPE)
    if hasattr(psf_image, "compute_kernel_image"):
        kernel = psf_image.compute_kernel_image(x, y)
    else:
        kernel = np.asarray(psf_image, dtype=float)
    kernel = np.asarray(kernel, dtype=np.float32)
    values = {
        "CRPIX1": float(wcs.wcs.crpix[0] - float(x_start)),
        "CRPIX2": float(wcs.wcs.crpix[1] - float(y_start)),
        "LTV1": -float(x_start),
        "LTV2": -float(y_start),
        "SRC_X": float(x),
        "SRC_Y": float(y),
    }
    key = _template_key(wcs, size, bunit, m is not None, kernel.shape)
    template = _TEMPLATES.get(key)
    if template is None or template.wcs is not wcs:
        data = _cutout_fits_astropy(img, var, m, kernel, wcs, x_start, y_start, x, y, bunit)
        _remember(key, _CutoutTemplate.from_fits(wcs, data))
        return data
    return template.render(values, [img, var] + ([m] if m is not None else []) + [kernel])


def _cutout_fits_astropy(img, var, m, kernel, wcs, x_start, y_start, x, y, bunit) -> bytes:
    """The cutout FITS file written by astropy (reference path; also builds the byte templates)."""
    header = _shifted_wcs(wcs, x_start, y_start).to_header(relax=True)
    header["BUNIT"] = bunit
    header["LTV1"] = (-float(x_start), "parent x = cutout x - LTV1")
    header["LTV2"] = (-float(y_start), "parent y = cutout y - LTV2")
    header["SRC_X"] = (float(x), "source x, parent pixel coordinates (0-based)")
    header["SRC_Y"] = (float(y), "source y, parent pixel coordinates (0-based)")
    hdus = [fits.PrimaryHDU(img, header=header)]
    hdus[0].header["EXTNAME"] = "IMAGE"
    var_header = header.copy()
    var_header["BUNIT"] = f"({bunit})**2"
    hdus.append(fits.ImageHDU(var, header=var_header, name="VARIANCE"))
    if m is not None:
        mhdr = header.copy()
        del mhdr["BUNIT"]
        for key, value in plane_header().items():
            mhdr[key if len(key) <= 8 else f"HIERARCH {key}"] = value
        hdus.append(fits.ImageHDU(m, header=mhdr, name="MASK"))
    psf_hdu = fits.ImageHDU(kernel, name="PSF")
    psf_hdu.header["COMMENT"] = "PSF kernel at the source position, centred on the central pixel, sum 1"
    hdus.append(psf_hdu)
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


#: cards that differ between cutouts of one parent image (everything else in the headers is fixed)
_VARYING_CARDS = ("CRPIX1", "CRPIX2", "LTV1", "LTV2", "SRC_X", "SRC_Y")
_TEMPLATES: dict = {}
_MAX_TEMPLATES = 16


def _template_key(wcs: WCS, size: int, bunit: str, has_mask: bool, kernel_shape) -> tuple:
    """What fixes the header bytes of a cutout: the WCS (by identity *and* content, so that a
    WCS modified in place gets a new template), size, unit, planes and PSF kernel shape."""
    w = wcs.wcs
    sip = wcs.sip
    sip_key = None if sip is None else (sip.a.tobytes(), sip.b.tobytes())
    lin = w.cd.tobytes() if w.has_cd() else (w.pc.tobytes(), w.cdelt.tobytes())
    return (id(wcs), w.crpix.tobytes(), w.crval.tobytes(), lin, tuple(w.ctype), sip_key, size, bunit, has_mask,
            tuple(kernel_shape))


def _remember(key, template) -> None:
    if len(_TEMPLATES) >= _MAX_TEMPLATES:
        _TEMPLATES.pop(next(iter(_TEMPLATES)))
    _TEMPLATES[key] = template


def _float_card(keyword: str, value: float, comment: str) -> bytes:
    """The 80-byte card astropy writes for a float value (its fixed format: the shortest repr,
    right-aligned in 20 columns), without astropy's Card machinery (~1 ms per card). Values
    whose repr would need astropy's exponent or truncation rules go through `fits.Card`."""
    text = repr(float(value))
    if "." not in text and "e" not in text and text.lstrip("-").isdigit():
        text += ".0"
    if len(text) <= 20 and "e" not in text and len(keyword) <= 8 and text[-1].isdigit():
        card = f"{keyword:<8}= {text:>20}" + (f" / {comment}" if comment else "")
        if len(card) <= 80 and card.isascii():
            return card.ljust(80).encode("ascii")
    return fits.Card(keyword, value, comment).image.encode("ascii")


class _CutoutTemplate:
    """The bytes of one astropy-written cutout, with the per-cutout cards and pixel blocks
    located, so that further cutouts of the same parent are written by substitution.

    astropy's Header/Card machinery costs ~25 ms per cutout (three per DiaSource); a cutout
    differs from its neighbour only in six header values and the pixels. The output is the
    same FITS file up to the formatting of CRPIX1/2 (astropy's float format instead of
    wcslib's; the values are identical).
    """

    def __init__(self, wcs, headers, cards, comments, data_spans, dtypes):
        self.wcs = wcs  # kept alive so that id(wcs) in the key is not reused
        self.headers = headers  # list of bytearray, one per HDU
        self.cards = cards  # per HDU: {keyword: byte offset of its card}
        self.comments = comments  # keyword -> comment
        self.data_spans = data_spans  # padded data length per HDU
        self.dtypes = dtypes  # big-endian dtype per HDU

    @classmethod
    def from_fits(cls, wcs, data: bytes) -> _CutoutTemplate:
        headers, cards, spans, dtypes, comments = [], [], [], [], {}
        with fits.open(io.BytesIO(data)) as hdul:
            for i, hdu in enumerate(hdul):
                info = hdul.fileinfo(i)
                head = bytearray(data[info["hdrLoc"] : info["datLoc"]])
                where = {}
                for off in range(0, len(head), 80):
                    kw = head[off : off + 8].decode("ascii").rstrip()
                    if kw in _VARYING_CARDS:
                        where[kw] = off
                        comments[kw] = hdu.header.comments[kw]
                headers.append(head)
                cards.append(where)
                spans.append(info["datSpan"])
                dtypes.append(hdu.data.dtype.newbyteorder(">"))
        return cls(wcs, headers, cards, comments, spans, dtypes)

    def render(self, values: dict, arrays: list) -> bytes:
        images = {kw: _float_card(kw, values[kw], self.comments.get(kw, "")) for kw in _VARYING_CARDS}
        parts = []
        for head, where, span, dtype, arr in zip(self.headers, self.cards, self.data_spans, self.dtypes, arrays):
            head = bytearray(head)
            for kw, off in where.items():
                head[off : off + 80] = images[kw]
            raw = np.ascontiguousarray(arr, dtype=dtype).tobytes()
            parts.append(bytes(head))
            parts.append(raw)
            parts.append(b"\0" * (span - len(raw)))
        return b"".join(parts)


# -- packets ----------------------------------------------------------------------


def build_alert_packet(
    dia_source,
    dia_object=None,
    prv_dia_sources: pd.DataFrame | None = None,
    prv_dia_forced_sources: pd.DataFrame | None = None,
    *,
    cutout_difference: bytes | None = None,
    cutout_science: bytes | None = None,
    cutout_template: bytes | None = None,
    observation_reason: str | None = None,
    target_name: str | None = None,
    window_days: float = PREVIOUS_WINDOW_DAYS,
    schema: dict | None = None,
) -> dict:
    """Assemble one alert packet (a dict in the alert schema).

    Parameters
    ----------
    dia_source : mapping or `pandas.Series`
        The triggering DiaSource row, APDB column names.
    dia_object : mapping or `pandas.Series`, optional
        Its (updated) DiaObject row.
    prv_dia_sources, prv_dia_forced_sources : `pandas.DataFrame`, optional
        The object's history. Kept: rows within ``window_days`` before the
        source's ``midpointMjdTai`` (and not after it), excluding the
        triggering source itself; sorted by time. An empty history gives null.
    cutout_difference, cutout_science, cutout_template : `bytes`, optional
        FITS cutouts from `make_cutout`.
    observation_reason, target_name : `str`, optional
        Scheduler metadata (RTN-097), null if unknown.
    window_days : `float`
        History window (12 months of 30 days).
    schema : `dict`, optional
        Parsed alert schema; default `load_alert_schema()`.

    Returns
    -------
    packet : `dict`
    """
    schema = load_alert_schema() if schema is None else schema
    if isinstance(dia_source, pd.Series):
        dia_source = dia_source.to_dict()
    src_rec = record_from_row(dia_source, _record_schema(schema, "diaSource"), what="diaSource")
    t_now = src_rec["midpointMjdTai"]

    def history(table, what, record):
        if table is None or len(table) == 0:
            return None
        if "midpointMjdTai" not in table.columns:
            raise KeyError(f"{what} needs a 'midpointMjdTai' column")
        t = table["midpointMjdTai"].to_numpy(dtype=float)
        keep = (t >= t_now - window_days) & (t <= t_now)
        if "diaSourceId" in table.columns:
            keep &= table["diaSourceId"].to_numpy() != src_rec["diaSourceId"]
        rows = table.loc[keep].sort_values("midpointMjdTai", kind="stable")
        if len(rows) == 0:
            return None
        return _records(rows, _record_schema(schema, record), what)

    packet = {
        "diaSourceId": src_rec["diaSourceId"],
        "observation_reason": observation_reason,
        "target_name": target_name,
        "diaSource": src_rec,
        "prvDiaSources": history(prv_dia_sources, "prvDiaSources", "diaSource"),
        "prvDiaForcedSources": history(prv_dia_forced_sources, "prvDiaForcedSources", "diaForcedSource"),
        "diaObject": None
        if dia_object is None
        else record_from_row(dia_object, _record_schema(schema, "diaObject"), what="diaObject"),
        "ssSource": None,
        "mpc_orbits": None,
        "cutoutDifference": cutout_difference,
        "cutoutScience": cutout_science,
        "cutoutTemplate": cutout_template,
    }
    # Fields of the top-level record we do not know how to fill stay null
    # (only possible for a newer schema passed in explicitly).
    top = {f["name"] for f in schema["fields"]}
    packet = {k: v for k, v in packet.items() if k in top}
    for name in top - packet.keys():
        packet[name] = None
    return packet


# -- validation -------------------------------------------------------------------


def _check_names(value, ftype, path: str, types: dict) -> None:
    """Recursive exact-field-name check of ``value`` against ``ftype``."""
    if isinstance(ftype, list):
        if value is None:
            return
        candidates = [t for t in ftype if t != "null"]
        errors = []
        for t in candidates:
            try:
                _check_names(value, t, path, types)
                return
            except AlertValidationError as err:
                errors.append(str(err))
        raise AlertValidationError(errors[0] if errors else f"{path}: null-only union got a value")
    if isinstance(ftype, str):
        if ftype in types:
            ftype = types[ftype]
        else:
            return  # primitive
    kind = ftype.get("type")
    if kind == "record":
        if not isinstance(value, Mapping):
            raise AlertValidationError(f"{path}: expected a record ({ftype['name']}), got {type(value).__name__}")
        names = [f["name"] for f in ftype["fields"]]
        extra = sorted(set(value) - set(names))
        missing = sorted(set(names) - set(value))
        if extra or missing:
            raise AlertValidationError(
                f"{path or 'packet'}: field names differ from schema record {ftype['name']!r}: "
                f"unknown {extra}, missing {missing}"
            )
        for f in ftype["fields"]:
            _check_names(value[f["name"]], f["type"], f"{path}.{f['name']}" if path else f["name"], types)
    elif kind == "array":
        if not isinstance(value, (list, tuple)):
            raise AlertValidationError(f"{path}: expected an array, got {type(value).__name__}")
        for i, item in enumerate(value):
            _check_names(item, ftype["items"], f"{path}[{i}]", types)
    elif isinstance(kind, (dict, list)):
        _check_names(value, kind, path, types)


def validate_packet(packet: Mapping, schema: dict | None = None) -> None:
    """Raise `AlertValidationError` unless ``packet`` follows ``schema`` exactly.

    Two checks: fastavro's validation (types, required fields, unions), and a
    recursive comparison of the field names of every record (no unknown key,
    none missing), which fastavro does not do.
    """
    schema = load_alert_schema() if schema is None else schema
    types = _named_types(schema)
    _check_names(packet, schema, "", types)
    try:
        fastavro.validation.validate(packet, _schema_info(schema)[2], raise_errors=True)
    except fastavro.validation.ValidationError as err:
        raise AlertValidationError(f"packet {packet.get('diaSourceId')}: {err}") from err


# -- files ----------------------------------------------------------------------


def write_alerts(
    packets: Iterable[Mapping],
    path,
    schema: dict | None = None,
    *,
    validate: bool = True,
    codec: str = "deflate",
) -> int:
    """Write packets to an Avro object container file (schema embedded).

    Every packet is checked with `validate_packet` first unless ``validate``
    is False. Written to a temporary name and renamed, so a crash never leaves
    a truncated file under ``path``. Returns the number of packets written.
    """
    schema = load_alert_schema() if schema is None else schema
    packets = list(packets)
    if validate:
        for packet in packets:
            validate_packet(packet, schema)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as stream:
            fastavro.writer(stream, _schema_info(schema)[2], packets, codec=codec)
            stream.flush()
            os.fsync(stream.fileno())  # the rename must never publish unwritten blocks
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(packets)


def read_alerts(path) -> list[dict]:
    """Read all packets of an Avro container file written by `write_alerts`."""
    with open(os.fspath(path), "rb") as stream:
        return list(fastavro.reader(stream))
