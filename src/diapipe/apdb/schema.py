"""The APDB schema of the installed lsst-sdm-schemas (``apdb.yaml``), parsed once.

One home for reading it: the DiaSource transform and the DiaObject summary
both follow the schema the APDB is created with.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["apdb_schema_tables", "apdb_schema_path"]


def apdb_schema_path():
    """``apdb.yaml`` inside the installed lsst-sdm-schemas package."""
    return resources.files("lsst.sdm.schemas").joinpath("apdb.yaml")


@functools.cache
def apdb_schema_tables() -> dict[str, list[dict]]:
    """Table name -> list of column dicts (name, datatype, nullable, fits:tunit, ...)."""
    import yaml

    # the C loader parses the 84 kB schema ~8x faster than the pure-Python one
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with apdb_schema_path().open("r") as stream:
        schema = yaml.load(stream, Loader=loader)
    return {table["name"]: table["columns"] for table in schema["tables"]}
