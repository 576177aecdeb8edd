"""Alert packets: schema 11.1, exact field names, Avro round trip, FITS cutouts with WCS."""

import io

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from diapipe.alerts.packets import (
    ALERT_SCHEMA_VERSION,
    AlertValidationError,
    build_alert_packet,
    load_alert_schema,
    make_cutout,
    read_alerts,
    validate_packet,
    write_alerts,
)
from diapipe.association.summary import apdb_columns, dia_object_summary
from diapipe.exposure.psf import PixelPsf


def _fill(record_name, rng, n, **fixed):
    """Synthetic APDB rows with *every* column of the APDB table (plus random values)."""
    table = {"diaSource": "DiaSource", "diaForcedSource": "DiaForcedSource"}[record_name]
    from diapipe.apdb.schema import apdb_schema_tables as _apdb_tables

    cols = {c["name"]: c["datatype"] for c in _apdb_tables()[table]}
    data = {}
    for name, dtype in cols.items():
        if dtype in ("long", "int", "short"):
            data[name] = rng.integers(1, 1000, n)
        elif dtype in ("double", "float"):
            data[name] = rng.normal(0, 1, n)
        elif dtype == "boolean":
            data[name] = rng.random(n) < 0.5
        elif dtype == "char":
            data[name] = ["r"] * n
        else:
            data[name] = ["v1"] * n
    df = pd.DataFrame(data)
    for key, value in fixed.items():
        df[key] = value
    return df


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(9)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crpix = [60.0, 40.0]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.cd = [[-0.2 / 3600, 0.0], [0.0, 0.2 / 3600]]
    image = rng.normal(0, 10, (100, 120))
    variance = np.full(image.shape, 100.0)
    psf = PixelPsf.gaussian(1.8, size=19)
    history = _fill("diaSource", rng, 6, diaObjectId=77, band="r")
    history["diaSourceId"] = np.arange(100, 106)
    history["midpointMjdTai"] = [59500.0, 60100.0, 60200.0, 60300.0, 60390.0, 60500.0]  # first too old, last later
    history["psfFluxErr"] = 50.0
    current = history.iloc[4].copy()  # the triggering source is part of the history table
    forced = _fill("diaForcedSource", rng, 4, diaObjectId=77, band="r")
    forced["midpointMjdTai"] = [59000.0, 60200.0, 60300.0, 60390.0]
    dia_object = dia_object_summary(history.iloc[:5], validity_start_mjd_tai=60390.01).iloc[0]
    return dict(wcs=wcs, image=image, variance=variance, psf=psf, history=history, current=current,
                forced=forced, dia_object=dia_object)


def _packet(scene, x=30.2, y=20.7):
    cut = {
        key: make_cutout(scene["image"], scene["variance"], scene["wcs"], scene["psf"], x, y)
        for key in ("cutout_difference", "cutout_science", "cutout_template")
    }
    return build_alert_packet(
        scene["current"], scene["dia_object"], scene["history"], scene["forced"], **cut
    )


def test_schema_version_matches_apdb():
    schema = load_alert_schema()
    assert ALERT_SCHEMA_VERSION == "11.1" and schema["name"].endswith("v11_1.alert")
    fields = {f["name"] for f in schema["fields"]}
    assert {"diaSource", "prvDiaSources", "prvDiaForcedSources", "diaObject", "cutoutDifference"} <= fields
    # every record field is an APDB 10.0.0 column of the same name
    from diapipe.alerts.packets import _record_schema

    for record, table in (("diaSource", "DiaSource"), ("diaObject", "DiaObject"),
                          ("diaForcedSource", "DiaForcedSource")):
        names = [f["name"] for f in _record_schema(schema, record)["fields"]]
        assert set(names) <= set(apdb_columns(table)), record


def test_packet_builds_validates_and_round_trips(scene, tmp_path):
    packet = _packet(scene)
    validate_packet(packet)
    assert packet["diaSourceId"] == int(scene["current"]["diaSourceId"])
    # history: within 360 days before, not after, not the source itself, time-ordered
    assert [p["diaSourceId"] for p in packet["prvDiaSources"]] == [101, 102, 103]
    assert [p["midpointMjdTai"] for p in packet["prvDiaForcedSources"]] == [60200.0, 60300.0, 60390.0]
    assert packet["diaObject"]["diaObjectId"] == 77 and packet["diaObject"]["r_psfFluxNdata"] == 5
    assert packet["diaObject"]["u_psfFluxMean"] is None  # NaN -> null
    path = tmp_path / "visit_detector.avro"
    packets = [packet, _packet(scene, x=1.0, y=98.6)]  # second one at the image corner
    assert write_alerts(packets, path) == 2
    back = read_alerts(path)
    assert len(back) == 2
    assert back[0]["diaSource"]["diaSourceId"] == packet["diaSource"]["diaSourceId"]
    assert back[0]["diaSource"]["ra"] == packet["diaSource"]["ra"]
    assert back[0]["cutoutScience"] == packet["cutoutScience"]
    for b in back:
        validate_packet(b)
    # a packet is small: 3 cutouts of 31x31 float32 + history
    assert len(path.read_bytes()) < 2 * 120_000


def test_cutout_fits_readable_with_working_wcs(scene):
    x, y = 30.2, 20.7
    data = make_cutout(scene["image"], scene["variance"], scene["wcs"], scene["psf"], x, y)
    with fits.open(io.BytesIO(data)) as hdul:
        assert [h.name for h in hdul] == ["IMAGE", "VARIANCE", "PSF"]
        img = hdul["IMAGE"].data
        assert img.shape == (31, 31)
        # pixel values are the parent's around round(x), round(y)
        np.testing.assert_array_equal(img, scene["image"][21 - 15 : 21 + 16, 30 - 15 : 30 + 16].astype(np.float32))
        w = WCS(hdul["IMAGE"].header)
        # the sky position of the source is the same through the cutout WCS
        ra, dec = scene["wcs"].pixel_to_world_values(x, y)
        cra, cdec = w.pixel_to_world_values(x - 15, y - 6)
        assert cra == pytest.approx(ra, abs=1e-10) and cdec == pytest.approx(dec, abs=1e-10)
        assert WCS(hdul["VARIANCE"].header).wcs.crpix[0] == pytest.approx(w.wcs.crpix[0])
        psf = hdul["PSF"].data
        assert psf.shape == (19, 19) and psf.sum() == pytest.approx(1.0, rel=1e-5)


def test_cutout_padded_at_edges_and_sip_kept(scene):
    wcs = scene["wcs"].deepcopy()
    sip_header = wcs.to_header()
    sip_header["CTYPE1"], sip_header["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    sip_header.update({"A_ORDER": 2, "B_ORDER": 2, "A_2_0": 1e-5, "B_0_2": -2e-5})
    sip_wcs = WCS(sip_header)
    mask = np.zeros(scene["image"].shape, dtype=np.int32)
    data = make_cutout(scene["image"], scene["variance"], sip_wcs, scene["psf"], 2.0, 97.0, mask=mask, size=33)
    with fits.open(io.BytesIO(data)) as hdul:
        img = hdul["IMAGE"].data
        assert img.shape == (33, 33)
        assert np.isnan(img[:, :14]).all() and np.isfinite(img[:16, 14:]).all() and np.isnan(img[-1]).all()
        assert hdul["MASK"].data[0, 0] != 0 and hdul["MASK"].data[5, 20] == 0
        w = WCS(hdul["IMAGE"].header)
        assert w.sip is not None
        ra, dec = sip_wcs.all_pix2world(5.0, 90.0, 0)
        cra, cdec = w.all_pix2world(5.0 - (2 - 16), 90.0 - (97 - 16), 0)
        assert cra == pytest.approx(ra, abs=1e-10) and cdec == pytest.approx(dec, abs=1e-10)
    with pytest.raises(ValueError, match="odd and >= 30"):
        make_cutout(scene["image"], scene["variance"], sip_wcs, scene["psf"], 5, 5, size=21)


def test_extra_misnamed_or_missing_fields_fail(scene):
    packet = _packet(scene)
    extra = dict(packet, diaSource=dict(packet["diaSource"], notAColumn=1.0))
    with pytest.raises(AlertValidationError, match="notAColumn"):
        validate_packet(extra)
    # misnamed nullable field: fastavro alone would accept this (missing nullable -> null)
    renamed = dict(packet["diaSource"])
    renamed["psfFlux_Err"] = renamed.pop("psfFluxErr")
    import fastavro

    assert fastavro.validation.validate(dict(packet, diaSource=renamed), load_alert_schema())
    with pytest.raises(AlertValidationError, match="psfFlux_Err"):
        validate_packet(dict(packet, diaSource=renamed))
    # nested in an array
    prv = [dict(p) for p in packet["prvDiaForcedSources"]]
    prv[1]["band_"] = "r"
    with pytest.raises(AlertValidationError, match=r"prvDiaForcedSources\[1\]"):
        validate_packet(dict(packet, prvDiaForcedSources=prv))
    # wrong type for a required field
    bad = dict(packet, diaSource=dict(packet["diaSource"], ra="ten"))
    with pytest.raises(AlertValidationError):
        validate_packet(bad)
    # top-level extra key
    with pytest.raises(AlertValidationError, match="cutoutExtra"):
        validate_packet(dict(packet, cutoutExtra=b""))
    # write_alerts refuses invalid packets
    with pytest.raises(AlertValidationError):
        write_alerts([extra], "/nonexistent/never_written.avro")


def test_missing_required_column_is_named(scene):
    row = scene["current"].drop(labels=["midpointMjdTai"])
    with pytest.raises(AlertValidationError, match="midpointMjdTai"):
        build_alert_packet(row)
