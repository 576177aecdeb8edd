"""make-repo: instrument, skymap, storage classes; exposure put/get through the butler."""

import subprocess
import sys

import numpy as np
import pytest
from lsst.daf.butler import Butler, DatasetType

from diapipe.butler.repo import RepositoryConfigError, check_repo_config, make_repo
from testing_helpers import make_test_exposure

TRACTS = [3828, 3829, 4431]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo") / "repo"
    make_repo(root, tract_ids=TRACTS)
    return root


def run_cli(*args):
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_detectors_listed_by_butler_cli(repo):
    out = run_cli(
        sys.prefix + "/bin/butler", "query-dimension-records", str(repo), "detector",
        "--where", "instrument='LSSTCam-imSim'",
    )
    rows = [line for line in out.splitlines() if line.strip().startswith("LSSTCam-imSim")]
    assert len(rows) == 189
    assert any("R22_S11" in line and " 94 " in f" {line} " for line in rows)


def test_tract_4431_has_49_patches(repo):
    butler = Butler.from_config(str(repo))
    patches = list(butler.registry.queryDimensionRecords("patch", skymap="DC2", tract=4431))
    assert sorted(p.id for p in patches) == list(range(49))
    skymap = butler.get("skyMap", skymap="DC2", collections="skymaps")
    assert skymap[4431].num_patches == (7, 7)
    # the stored skymap is the registered one
    record = next(iter(butler.registry.queryDimensionRecords("skymap", skymap="DC2")))
    assert record.hash == skymap.skymap_hash()


def test_patch_region_contains_patch_centre(repo):
    from lsst.sphgeom import LonLat, UnitVector3d

    butler = Butler.from_config(str(repo))
    skymap = butler.get("skyMap", skymap="DC2", collections="skymaps")
    patch = skymap[3828][24]
    ra, dec = patch.inner_center_radec
    record = next(iter(butler.registry.queryDimensionRecords("patch", skymap="DC2", tract=3828, patch=24)))
    assert record.region.contains(UnitVector3d(LonLat.fromDegrees(ra, dec)))


def test_exposure_put_get_every_component(repo):
    butler = Butler.from_config(str(repo), writeable=True, run="test/exposures")
    dataset_type = DatasetType("testExp", ["instrument", "detector"], "DiapipeExposure", universe=butler.dimensions)
    butler.registry.registerDatasetType(dataset_type)
    exposure = make_test_exposure()
    data_id = {"instrument": "LSSTCam-imSim", "detector": 33}
    butler.put(exposure, "testExp", data_id)
    back = butler.get("testExp", data_id)
    np.testing.assert_array_equal(back.image, exposure.image)
    np.testing.assert_array_equal(back.mask, exposure.mask)
    np.testing.assert_array_equal(back.variance, exposure.variance)
    np.testing.assert_array_equal(back.wcs.wcs.cd, exposure.wcs.wcs.cd)
    assert back.psf == exposure.psf
    assert back.visit_info == exposure.visit_info
    assert back.photo_calib == exposure.photo_calib
    assert back.metadata == exposure.metadata
    for component, expected in [
        ("image", exposure.image),
        ("mask", exposure.mask),
        ("variance", exposure.variance),
    ]:
        np.testing.assert_array_equal(butler.get(f"testExp.{component}", data_id), expected)
    assert butler.get("testExp.psf", data_id) == exposure.psf
    assert butler.get("testExp.visitInfo", data_id) == exposure.visit_info
    assert butler.get("testExp.photoCalib", data_id) == exposure.photo_calib
    assert butler.get("testExp.metadata", data_id) == exposure.metadata
    assert butler.get("testExp.bbox", data_id) == exposure.bbox
    np.testing.assert_array_equal(butler.get("testExp.wcs", data_id).wcs.crval, exposure.wcs.wcs.crval)
    cut = butler.get("testExp", data_id, parameters={"bbox": (1010, 2010, 16, 12)})
    np.testing.assert_array_equal(cut.image, exposure.subimage((1010, 2010, 16, 12)).image)


def test_repo_without_seed_config_is_a_clear_error(tmp_path):
    root = tmp_path / "plain"
    Butler.makeRepo(str(root))
    with pytest.raises(RepositoryConfigError, match="diapipe make-repo"):
        check_repo_config(Butler.from_config(str(root)))


def test_make_repo_refuses_existing(repo):
    with pytest.raises(FileExistsError, match=str(repo)):
        make_repo(repo, tract_ids=TRACTS)


def test_unknown_tract_and_patch(repo):
    butler = Butler.from_config(str(repo))
    skymap = butler.get("skyMap", skymap="DC2", collections="skymaps")
    with pytest.raises(LookupError, match="99999"):
        skymap[99999]
    with pytest.raises(LookupError, match="49"):
        skymap[4431][49]
