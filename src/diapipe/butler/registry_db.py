"""A diapipe butler repository whose registry lives in a database server (PostgreSQL).

`diapipe.butler.repo.make_repo` makes the default SQLite registry inside the
repository folder. Many processes on many nodes (bps) writing one registry
want a server instead; this is `make_repo` with ``registry.db`` set::

    make_repo_with_registry(root, "postgresql+psycopg2://diapipe@127.0.0.1:5432/registry")

The command-line equivalent is ``butler create --seed-config SEED
--override REPO`` with ``registry: {db: URL}`` added to the seed file, then
``diapipe make-repo``'s registrations. The database must exist and have
``CREATE EXTENSION btree_gist`` (daf_butler's PostgreSQL registry uses
exclusion constraints on timespans); `diapipe.apdb.postgres_server` does both.

The URL must not carry a password: it is written into ``REPO/butler.yaml``.
daf_butler finds the password in the db-auth file (``$LSST_DB_AUTH`` or
``~/.lsst/db-auth.yaml``), as dax_apdb does.
"""

from __future__ import annotations

import logging
import os

__all__ = ["make_repo_with_registry"]

_log = logging.getLogger(__name__)


def make_repo_with_registry(
    root: str | os.PathLike,
    registry_db_url: str,
    *,
    namespace: str | None = None,
    tract_ids=None,
):
    """Create a repository at ``root`` (datastore files there) with its registry at ``registry_db_url``.

    Registers the ``LSSTCam-imSim`` instrument and the DC2 skymap, as
    `diapipe.butler.repo.make_repo` does. Returns a writeable butler.

    Parameters
    ----------
    root : path-like
        Repository folder (``butler.yaml`` and the file datastore).
    registry_db_url : `str`
        ``postgresql+psycopg2://USER@HOST:PORT/DATABASE`` (``postgresql://`` is
        given the psycopg2 driver). No password.
    namespace : `str`, optional
        PostgreSQL schema for the registry tables (several repositories in one database).
    tract_ids : iterable of `int`, optional
        Tracts to register (default: the DC2 range).
    """
    import sqlalchemy
    from lsst.daf.butler import Butler, Config

    from ..instrument import LsstCamImSim
    from .repo import SEED_CONFIG, register_skymap

    url = sqlalchemy.make_url(registry_db_url)
    if url.password:
        raise ValueError(
            "registry_db_url contains a password, which would be written to butler.yaml: remove it and "
            "put it in the db-auth file ($LSST_DB_AUTH or ~/.lsst/db-auth.yaml)"
        )
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg2")
    root = os.fspath(root)
    if os.path.exists(os.path.join(root, "butler.yaml")):
        raise FileExistsError(f"{root} already holds a butler repository; choose another path")
    config = Config(SEED_CONFIG)
    config["registry", "db"] = url.render_as_string(hide_password=False)
    if namespace:
        config["registry", "namespace"] = namespace
    Butler.makeRepo(root, config=config)
    butler = Butler.from_config(root, writeable=True)
    LsstCamImSim().register(butler.registry)
    register_skymap(butler, tract_ids=tract_ids)
    _log.info("Created repository %s with registry %s", root, url.render_as_string(hide_password=True))
    return butler
