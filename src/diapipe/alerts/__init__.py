"""Alert packets (lsst-alert-packet Avro schema) with FITS cutouts."""

from .journal import AlertFile, AlertFileState
from .packets import (
    ALERT_SCHEMA_VERSION,
    PREVIOUS_WINDOW_DAYS,
    AlertValidationError,
    build_alert_packet,
    load_alert_schema,
    make_cutout,
    read_alerts,
    record_from_row,
    validate_packet,
    write_alerts,
)

__all__ = [
    "ALERT_SCHEMA_VERSION",
    "PREVIOUS_WINDOW_DAYS",
    "AlertFile",
    "AlertFileState",
    "AlertValidationError",
    "build_alert_packet",
    "load_alert_schema",
    "make_cutout",
    "read_alerts",
    "record_from_row",
    "validate_packet",
    "write_alerts",
]
