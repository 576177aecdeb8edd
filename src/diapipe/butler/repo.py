"""Create a diapipe butler repository: seed config, instrument, DC2 skymap."""

from __future__ import annotations

import logging
import os
from importlib import resources

import numpy as np
from lsst.daf.butler import Butler, Config, DatasetType
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

__all__ = [
    "SEED_CONFIG",
    "SKYMAP_COLLECTION",
    "DC2_TRACT_RANGE",
    "make_repo",
    "register_skymap",
    "check_repo_config",
    "RepositoryConfigError",
    "polygon_from_radec",
]

_log = logging.getLogger(__name__)

SEED_CONFIG = str(resources.files("diapipe.butler") / "seed.yaml")
SKYMAP_COLLECTION = "skymaps"
SKYMAP_NAME = "DC2"
#: DC2's footprint lies in tracts ~2553-5074 (the guide); registering only
#: those keeps the registry small (the full ring skymap has ~19k tracts).
DC2_TRACT_RANGE = (2553, 5074)


class RepositoryConfigError(RuntimeError):
    """A repository that lacks diapipe's storage classes or registrations."""


def polygon_from_radec(ra_deg, dec_deg) -> ConvexPolygon:
    """A sphgeom convex polygon through sky points (degrees)."""
    vectors = [UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in zip(ra_deg, dec_deg)]
    return ConvexPolygon.convexHull(vectors)


def check_repo_config(butler: Butler) -> None:
    """Raise `RepositoryConfigError` if ``butler`` was made without diapipe's seed config."""
    # The storage-class factory is process-global, so ask the repository's own config.
    config = getattr(butler, "_config", None)
    if config is None or "DiapipeExposure" not in config.get("storageClasses", {}):
        raise RepositoryConfigError(
            f"Repository {getattr(config, 'configDir', '')} does not know diapipe's "
            "storage classes (it was not created with diapipe's seed config). "
            "Create it with `diapipe make-repo REPO`, or `butler create --seed-config "
            f"{SEED_CONFIG} REPO`."
        )


def _tract_records(skymap, tract_ids):
    tracts, patches = [], []
    for tract_id in tract_ids:
        tract = skymap[tract_id]
        ra, dec = np.transpose(tract.vertices_radec)
        tracts.append({"skymap": skymap.name, "id": tract_id, "region": polygon_from_radec(ra, dec)})
        nx, ny = tract.num_patches
        for index in range(nx * ny):
            patch = tract[index]
            pra, pdec = np.transpose(patch.outer_vertices_radec)
            patches.append(
                {
                    "skymap": skymap.name,
                    "tract": tract_id,
                    "id": index,
                    "cell_x": patch.index_xy[0],
                    "cell_y": patch.index_xy[1],
                    "region": polygon_from_radec(pra, pdec),
                }
            )
    return tracts, patches


def register_skymap(butler: Butler, skymap=None, tract_ids=None) -> None:
    """Register skymap/tract/patch records and write the ``skyMap`` dataset.

    Parameters
    ----------
    skymap : `diapipe.skymap.RingsSkyMap`, optional
        Defaults to the DC2 skymap.
    tract_ids : iterable of `int`, optional
        Tracts to register; defaults to `DC2_TRACT_RANGE`.
    """
    from ..skymap import RingsSkyMap

    skymap = skymap if skymap is not None else RingsSkyMap(name=SKYMAP_NAME)
    if tract_ids is None:
        tract_ids = range(DC2_TRACT_RANGE[0], DC2_TRACT_RANGE[1] + 1)
    tract_ids = sorted(set(int(t) for t in tract_ids))
    registry = butler.registry
    nx, ny = skymap[tract_ids[0]].num_patches
    with registry.transaction():
        registry.syncDimensionData(
            "skymap",
            {
                "name": skymap.name,
                "hash": skymap.skymap_hash(),
                "tract_max": len(skymap),
                "patch_nx_max": nx,
                "patch_ny_max": ny,
            },
        )
        existing = {rec.id for rec in registry.queryDimensionRecords("tract", skymap=skymap.name)}
        todo = [t for t in tract_ids if t not in existing]
        if todo:
            tracts, patches = _tract_records(skymap, todo)
            registry.insertDimensionData("tract", *tracts)
            registry.insertDimensionData("patch", *patches)
    dataset_type = DatasetType("skyMap", ["skymap"], "DiapipeSkyMap", universe=butler.dimensions)
    registry.registerDatasetType(dataset_type)
    registry.registerRun(SKYMAP_COLLECTION)
    if not list(registry.queryDatasets("skyMap", collections=SKYMAP_COLLECTION, skymap=skymap.name)):
        butler.put(skymap, dataset_type, {"skymap": skymap.name}, run=SKYMAP_COLLECTION)


def make_repo(root: str | os.PathLike, *, tract_ids=None, overwrite: bool = False) -> Butler:
    """Create a repository at ``root`` that knows diapipe's types, the
    ``LSSTCam-imSim`` instrument and the ``DC2`` skymap. Returns a writeable butler.

    Raises `FileExistsError` if ``root`` already holds a repository.
    """
    from ..instrument import LsstCamImSim

    root = os.fspath(root)
    if os.path.exists(os.path.join(root, "butler.yaml")) and not overwrite:
        raise FileExistsError(f"{root} already holds a butler repository; choose another path")
    Butler.makeRepo(root, config=Config(SEED_CONFIG), overwrite=overwrite)
    butler = Butler.from_config(root, writeable=True)
    LsstCamImSim().register(butler.registry)
    register_skymap(butler, tract_ids=tract_ids)
    _log.info("Created repository %s with instrument LSSTCam-imSim and skymap DC2", root)
    return butler
