"""Reading an sqlite APDB the way the guide does (sqlite3 + pandas, today's column names).

Used by ``diapipe metrics`` (association figures) and ``diapipe report`` (plots).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from urllib.parse import unquote

import pandas as pd

__all__ = ["ApdbTables", "DIA_SOURCE_COLUMNS", "apdb_sqlite_path", "load_apdb"]

#: DiaSource columns the report reads (those present are selected).
DIA_SOURCE_COLUMNS = (
    "diaSourceId", "diaObjectId", "visit", "detector", "band", "midpointMjdTai", "ra", "dec", "x", "y",
    "psfFlux", "psfFluxErr", "snr", "pixelFlags_saturated", "pixelFlags_bad", "pixelFlags_edge",
    "psfFlux_flag", "isDipole",
)


@dataclass
class ApdbTables:
    """The current DiaObjects and all DiaSources of an APDB."""

    path: str
    dia_objects: pd.DataFrame
    dia_sources: pd.DataFrame


def apdb_sqlite_path(apdb) -> str:
    """The sqlite file of an APDB named by a path, an ``sqlite:///`` URL or an APDB config
    YAML (``apdb-cli create-sql`` / ``make_apdb.py`` output, whose ``db_url`` is read)."""
    text = str(apdb)
    if text.endswith((".yaml", ".yml")) and os.path.exists(text):
        import yaml

        with open(text) as stream:
            config = yaml.safe_load(stream) or {}
        url = _find_key(config, "db_url")
        if not url:
            raise ValueError(f"APDB config {text}: no db_url in it")
        text = str(url)
    if text.startswith("sqlite:"):
        # sqlite:////abs/path (4 slashes) or sqlite:///rel/path
        rest = text[len("sqlite:"):]
        if rest.startswith("///"):
            rest = rest[3:]
            text = "/" + rest.lstrip("/") if rest.startswith("/") else rest
        text = unquote(text)
    elif "://" in text:
        raise ValueError(f"APDB {apdb!r}: only sqlite APDBs can be read by the report (got another URL scheme)")
    return text


def _find_key(obj, key):
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for value in obj.values():
            found = _find_key(value, key)
            if found:
                return found
    return None


def _columns(connection, table: str) -> list[str]:
    return [row[1] for row in connection.execute(f'PRAGMA table_info("{table}")')]


def load_apdb(apdb) -> ApdbTables:
    """Current DiaObjects (``validityEndMjdTai IS NULL``) and DiaSources of an sqlite APDB,
    read with sqlite3 and pandas as in the guide (today's column names)."""
    path = apdb_sqlite_path(apdb)
    if not os.path.exists(path):
        raise FileNotFoundError(f"APDB {apdb}: no database file {path}")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        obj_cols = _columns(connection, "DiaObject")
        if not obj_cols:
            raise ValueError(f"APDB {path}: no DiaObject table (is it an APDB?)")
        where = ' WHERE "validityEndMjdTai" IS NULL' if "validityEndMjdTai" in obj_cols else ""
        objects = pd.read_sql_query(f'SELECT * FROM "DiaObject"{where}', connection)
        src_cols = [c for c in DIA_SOURCE_COLUMNS if c in _columns(connection, "DiaSource")]
        if src_cols:
            quoted = ", ".join(f'"{c}"' for c in src_cols)
            sources = pd.read_sql_query(f'SELECT {quoted} FROM "DiaSource"', connection)
        else:
            sources = pd.DataFrame(columns=list(DIA_SOURCE_COLUMNS))
    finally:
        connection.close()
    return ApdbTables(path=path, dia_objects=objects, dia_sources=sources)
