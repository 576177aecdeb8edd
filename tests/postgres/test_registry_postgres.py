"""A butler repository whose registry is PostgreSQL (btree_gist) runs ApTemplate's single-frame subset."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml
from testing_helpers import TEMPLATE_COLLECTION


@pytest.mark.slow
def test_postgres_registry_runs_single_frame(postgres_server, template_repo, tmp_path):
    from lsst.daf.butler import Butler
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    from diapipe.butler.registry_db import make_repo_with_registry
    from diapipe.pipelines import ap_pipe_dir, pipeline_path
    from diapipe.sim.simulate import simulate_repo

    url = postgres_server.create_database("registry_test", btree_gist=True)
    root = tmp_path / "repo"
    make_repo_with_registry(root, url, tract_ids=[3828])
    config_text = (root / "butler.yaml").read_text()
    assert "postgresql+psycopg2://diapipe@127.0.0.1" in config_text
    # same seed as the session's sim_repo: identical raws, so identical calexps
    simulate_repo(root, "test", seed=1, jobs=1)

    butler = Butler.from_config(str(root), writeable=True)
    assert butler.registry.getCollectionType("2.2i/defaults/test").name == "CHAINED"
    visits = sorted(rec.id for rec in butler.query_dimension_records("visit", instrument="LSSTCam-imSim"))[:2]
    # spatial join (visit/detector regions vs. htm7 refcat shards) through PostgreSQL
    os.environ.setdefault("AP_PIPE_DIR", ap_pipe_dir())
    run_butler = SimplePipelineExecutor.prep_butler(str(root), inputs=["2.2i/defaults/test"], output="u/test/pg-sfp")
    pipe = Pipeline.from_uri(pipeline_path("ApTemplate.yaml") + "#singleFrameAp")
    executor = SimplePipelineExecutor.from_pipeline(
        pipe, where=f"instrument='LSSTCam-imSim' AND visit IN ({visits[0]}, {visits[1]})", butler=run_butler
    )
    quanta = executor.run(register_dataset_types=True)
    assert len(quanta) == 2 * 3 + 2  # isr, characterizeImage, calibrate per visit; consolidate per visit

    reference = Butler.from_config(str(template_repo))
    for visit in visits:
        data_id = {"instrument": "LSSTCam-imSim", "visit": visit, "detector": 94}
        ours = butler.get("calexp", data_id, collections="u/test/pg-sfp")
        theirs = reference.get("calexp", data_id, collections=TEMPLATE_COLLECTION)
        for plane in ("image", "mask", "variance"):
            assert np.array_equal(getattr(ours, plane), getattr(theirs, plane), equal_nan=True), (visit, plane)
        assert butler.get("visitSummary", instrument="LSSTCam-imSim", visit=visit, collections="u/test/pg-sfp") is not None

    passwords = [e["password"] for e in yaml.safe_load(postgres_server.auth_file.read_text())]
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(pw.encode() in data for pw in passwords), path
