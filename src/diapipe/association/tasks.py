"""diaPipe: association of DiaSources into the APDB, DiaObject summaries,
forced photometry and alert packets (the guide's ``DiaPipelineTask``).

The APDB is named either today's way, ``apdb_config_url`` (the YAML written by
``apdb-cli create-sql``), or the guide's way::

    diaPipe:
      class: diapipe.association.tasks.DiaPipelineTask
      config:
        apdb.isolation_level: READ_UNCOMMITTED
        apdb.db_url: 'sqlite:////abs/path/run1.db'

with the APDB made by ``make_apdb.py -c isolation_level=READ_UNCOMMITTED -c
db_url=...``. Neither set is a configuration error (no default can point at a
user's database). The steps are in `diapipe.association.dia_pipe`.
"""

from __future__ import annotations

import os

import lsst.pex.config as pexConfig
import lsst.pipe.base as pipeBase
import lsst.pipe.base.connectionTypes as cT

from ..errors import BadInputError, data_id_str

__all__ = ["DiaPipelineTask", "DiaPipelineConfig", "DiaPipelineConnections", "ApdbConnectionConfig"]

_NEED_APDB = (
    "diaPipe needs an APDB: set apdb_config_url (the file written by `apdb-cli create-sql "
    "sqlite:////abs/path/apdb.db apdb.yaml`) or apdb.db_url (the guide's: `make_apdb.py -c "
    "isolation_level=READ_UNCOMMITTED -c db_url=sqlite:////abs/path/run1.db`), e.g. in your own pipeline "
    "that imports ApPipe.yaml: tasks: diaPipe: class: diapipe.association.tasks.DiaPipelineTask, config: "
    "apdb.db_url: 'sqlite:////abs/path/run1.db', apdb.isolation_level: READ_UNCOMMITTED; or on the command "
    "line: -c diaPipe:apdb.db_url=sqlite:////abs/path/run1.db"
)


class DiaPipelineConnections(pipeBase.PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    diaSourceTable = cT.Input(
        name="goodSeeingDiff_diaSrcTable",
        doc="DiaSources of the difference image, in APDB DiaSource columns.",
        storageClass="DataFrame",
        dimensions=("instrument", "visit", "detector"),
    )
    diffIm = cT.Input(
        name="goodSeeingDiff_differenceExp",
        doc="Difference image (forced psfFlux, difference cutouts).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    exposure = cT.Input(
        name="calexp",
        doc="Calibrated science exposure (region, forced scienceFlux, science cutouts).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    template = cT.Input(
        name="goodSeeingDiff_templateExp",
        doc="Template on the detector grid (template cutouts).",
        storageClass="DiapipeExposure",
        dimensions=("instrument", "visit", "detector"),
    )
    apdbMarker = cT.Output(
        name="apdb_marker",
        doc="Marker that this detector-visit is in the APDB, with counts of what was stored.",
        storageClass="StructuredDataDict",
        dimensions=("instrument", "visit", "detector"),
    )
    associatedDiaSources = cT.Output(
        name="goodSeeingDiff_assocDiaSrc",
        doc="The stored DiaSources with their diaObjectId.",
        storageClass="DataFrame",
        dimensions=("instrument", "visit", "detector"),
    )

    def __init__(self, *, config=None):
        super().__init__(config=config)
        if not config.doWriteAssociatedSources:
            del self.associatedDiaSources


class ApdbConnectionConfig(pexConfig.Config):
    """The guide's ``apdb.*`` settings (2022 DiaPipelineTask's ``apdb`` field)."""

    db_url = pexConfig.Field(
        dtype=str,
        default=None,
        optional=True,
        doc="SQLAlchemy URL of the APDB, e.g. sqlite:////abs/path/run1.db or postgresql://user@host/db "
        "(no password: put it in ~/.lsst/db-auth.yaml or ~/.pgpass).",
    )
    isolation_level = pexConfig.ChoiceField(
        dtype=str,
        default=None,
        optional=True,
        allowed={
            "READ_COMMITTED": "PostgreSQL default",
            "READ_UNCOMMITTED": "the guide's sqlite setting (dax_apdb's sqlite default)",
            "REPEATABLE_READ": "PostgreSQL",
            "SERIALIZABLE": "sqlite or PostgreSQL",
        },
        doc="Transaction isolation level; must match the one given to make_apdb.py.",
    )
    connection_timeout = pexConfig.Field(
        dtype=float,
        default=600.0,
        doc="Seconds to wait for a database lock (sqlite busy timeout) or a connection.",
    )
    namespace = pexConfig.Field(dtype=str, default=None, optional=True, doc="Database schema (PostgreSQL).")
    prefix = pexConfig.Field(dtype=str, default=None, optional=True, doc="Table-name prefix used at creation.")


class DiaPipelineConfig(pipeBase.PipelineTaskConfig, pipelineConnections=DiaPipelineConnections):
    apdb_config_url = pexConfig.Field(
        dtype=str,
        default=None,
        optional=True,
        doc="APDB config file (today's way: written by `apdb-cli create-sql` or make_apdb.py).",
    )
    apdb = pexConfig.ConfigField(dtype=ApdbConnectionConfig, doc="The APDB by database URL (the guide's way).")
    maxAssociationDistArcsec = pexConfig.RangeField(
        dtype=float, default=1.0, min=0.0, inclusiveMin=False, doc="Association radius (arcsec)."
    )
    diaObjectHistoryDays = pexConfig.RangeField(
        dtype=float, default=360.0, min=0.0, doc="History (days) of DiaSources/DiaForcedSources put in alerts."
    )
    fullHistorySummary = pexConfig.Field(
        dtype=bool,
        default=True,
        doc="DiaObject summaries over every DiaSource of the object (False: only diaObjectHistoryDays).",
    )
    regionMarginPixels = pexConfig.RangeField(
        dtype=int, default=250, min=0, doc="Margin (pixels) around the detector for loading DiaObjects."
    )
    failOnRerun = pexConfig.Field(
        dtype=bool,
        default=False,
        doc="A detector-visit already in the APDB fails the quantum (default: skip it with a warning).",
    )
    doWriteAssociatedSources = pexConfig.Field(
        dtype=bool, default=True, doc="Write goodSeeingDiff_assocDiaSrc."
    )
    doWriteAlerts = pexConfig.Field(dtype=bool, default=True, doc="Write Avro alert packets.")
    alertsPath = pexConfig.Field(
        dtype=str,
        default="",
        doc="Folder of the Avro alert files ({visit}_{detector}.avro; a '.avro.pending' file is not published "
        "yet: see diapipe.alerts.journal). Empty: '<name>_alerts' beside an sqlite APDB file (required for "
        "other backends).",
    )
    alertCutoutSize = pexConfig.Field(dtype=int, default=31, doc="Cutout size (odd, >= 31 pixels).")

    def validate(self):
        super().validate()
        from ..apdb import url_has_password

        if not self.apdb_config_url and not self.apdb.db_url:
            raise pexConfig.FieldValidationError(DiaPipelineConfig.apdb_config_url, self, _NEED_APDB)
        if self.apdb_config_url and self.apdb.db_url:
            raise pexConfig.FieldValidationError(
                DiaPipelineConfig.apdb_config_url,
                self,
                "set only one of apdb_config_url and apdb.db_url (they could name different APDBs)",
            )
        if self.apdb.db_url and url_has_password(self.apdb.db_url):
            raise pexConfig.FieldValidationError(
                ApdbConnectionConfig.db_url,
                self.apdb,
                "apdb.db_url contains a password, which would be stored with the pipeline config in the "
                "butler; remove it and put it in ~/.lsst/db-auth.yaml (dax_apdb) or ~/.pgpass",
            )
        if self.alertCutoutSize < 31 or self.alertCutoutSize % 2 == 0:
            raise pexConfig.FieldValidationError(
                DiaPipelineConfig.alertCutoutSize, self, f"must be odd and >= 31, got {self.alertCutoutSize}"
            )


class DiaPipelineTask(pipeBase.PipelineTask):
    """Associate a detector-visit's DiaSources into the APDB and write its alerts."""

    ConfigClass = DiaPipelineConfig
    _DefaultName = "diaPipe"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._apdb = None

    # -- APDB ----------------------------------------------------------------
    def get_apdb(self):
        """The APDB named by the config (opened once per task)."""
        from ..apdb import open_apdb

        if self._apdb is None:
            config = self.config
            if config.apdb_config_url:
                self._apdb = open_apdb(
                    config_url=config.apdb_config_url,
                    isolation_level=config.apdb.isolation_level,
                    connection_timeout=config.apdb.connection_timeout,
                )
            else:
                self._apdb = open_apdb(
                    db_url=config.apdb.db_url,
                    isolation_level=config.apdb.isolation_level,
                    connection_timeout=config.apdb.connection_timeout,
                    namespace=config.apdb.namespace,
                    prefix=config.apdb.prefix,
                )
        return self._apdb

    def alerts_folder(self) -> str:
        """Where the Avro files go (see ``alertsPath``)."""
        from ..apdb import sqlite_path

        if self.config.alertsPath:
            return os.path.abspath(os.path.expanduser(self.config.alertsPath))
        db_file = sqlite_path(self.get_apdb().getConfig().db_url)
        if db_file is None:
            raise pipeBase.InvalidQuantumError(
                "diaPipe.alertsPath is empty and the APDB is not an sqlite file: set alertsPath (a folder) "
                "or doWriteAlerts=False"
            )
        return str(db_file.with_name(db_file.stem + "_alerts"))

    # -- execution -----------------------------------------------------------
    def runQuantum(self, butlerQC, inputRefs, outputRefs):
        inputs = butlerQC.get(inputRefs)
        data_id = butlerQC.quantum.dataId
        outputs = self.run(
            **inputs,
            visit=int(data_id["visit"]),
            detector=int(data_id["detector"]),
            band=str(data_id["band"]) if "band" in data_id else None,
        )
        butlerQC.put(outputs, outputRefs)

    def run(self, *, diaSourceTable, diffIm, exposure, template=None, visit=None, detector=None, band=None):
        """Associate, store and alert one detector-visit.

        Returns
        -------
        result : `lsst.pipe.base.Struct`
            ``apdbMarker`` (dict of counts; ``alreadyInApdb`` True when the
            detector-visit was skipped), ``associatedDiaSources`` (DataFrame),
            ``alertsFile`` (path or None), ``packets`` (list of dicts).
        """
        from ..apdb import ApdbAccessError
        from .dia_pipe import DiaPipeParameters, build_alerts, process_detector_visit

        info = exposure.visit_info
        visit = visit if visit is not None else getattr(info, "visit", None)
        detector = detector if detector is not None else getattr(info, "detector", None)
        band = band or getattr(info, "band", "") or None
        where = f"visit={visit}, detector={detector}"
        if visit is None or detector is None or not band:
            raise BadInputError(f"calexp {where}: visit, detector and band are needed (visit_info incomplete)")
        mjd = float(getattr(info, "mjd_tai", float("nan")))
        if not mjd == mjd:
            raise BadInputError(f"calexp {where} has no exposure midpoint (visit_info.mjd_tai)")
        if exposure.wcs is None or diffIm.wcs is None:
            raise BadInputError(f"calexp or difference image of {where} has no WCS")

        config = self.config
        try:
            apdb = self.get_apdb()
        except ApdbAccessError as err:
            raise pipeBase.InvalidQuantumError(f"diaPipe {where}: {err}") from err
        folder = self.alerts_folder() if config.doWriteAlerts else None
        sink = None
        if folder is not None:
            sink = _AlertSink(
                folder, visit, detector,
                lambda result: build_alerts(
                    result, diffIm, exposure, template,
                    history_days=config.diaObjectHistoryDays, cutout_size=config.alertCutoutSize,
                ),
            )
        params = DiaPipeParameters(
            max_association_dist_arcsec=config.maxAssociationDistArcsec,
            history_days=config.diaObjectHistoryDays,
            region_margin_pix=config.regionMarginPixels,
            full_history_summary=config.fullHistorySummary,
            fail_on_rerun=config.failOnRerun,
        )
        try:
            result = process_detector_visit(
                apdb,
                diaSourceTable,
                diffIm,
                exposure,
                visit=visit,
                detector=detector,
                band=band,
                midpoint_mjd_tai=mjd,
                params=params,
                log=self.log,
                alert_sink=sink,
            )
        except (KeyError, ValueError, TypeError) as err:
            raise BadInputError(f"goodSeeingDiff_diaSrcTable of {where}: {err}") from err
        marker = result.marker()
        marker.update({"visit": int(visit), "detector": int(detector), "band": band})
        for key, value in marker.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.metadata[key] = value
        for key, value in result.timings.items():
            self.metadata[key] = float(value)

        alerts_file, packets = None, []
        if result.alerts is not None:
            state, path, n_alerts = result.alerts
            packets = sink.packets
            marker["alertsState"] = state
            if state != "missing":
                alerts_file = path
                marker["alertsFile"] = path
                marker["numAlerts"] = int(n_alerts)
        if not result.skipped:
            self.log.info(
                "%s: %d DiaSources -> %d updated + %d new DiaObjects, %d forced sources%s",
                where,
                result.n_dia_sources,
                result.n_updated_dia_objects,
                result.n_new_dia_objects,
                result.n_forced_sources,
                f", {len(packets)} alerts in {alerts_file}" if alerts_file else "",
            )
        associated = result.dia_sources
        if associated is None:
            import pandas as pd

            associated = pd.DataFrame({"diaSourceId": pd.Series(dtype="int64"), "diaObjectId": pd.Series(dtype="int64")})
        struct = pipeBase.Struct(apdbMarker=marker, alertsFile=alerts_file, packets=packets)
        if config.doWriteAssociatedSources:
            struct.associatedDiaSources = associated
        return struct


class _AlertSink:
    """`process_detector_visit`'s alert output: packets built by ``build(result)`` go
    through `diapipe.alerts.AlertFile` (pending file before the store, published after)."""

    def __init__(self, folder, visit, detector, build):
        from ..alerts import AlertFile

        self.file = AlertFile(folder, visit, detector)
        self.build = build
        self.packets: list = []

    def prepare(self, result) -> int:
        self.packets = self.build(result)
        return self.file.prepare(self.packets)

    def commit(self) -> str:
        return self.file.commit()

    def recover(self):
        return self.file.recover()
