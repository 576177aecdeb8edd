"""Session-wide fixtures: one simulated repository and one run of each
pipeline, shared by every test (and every pytest-xdist worker, through a
file lock), because simulating and processing cost minutes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testing_helpers import SIM_SEED, TEMPLATE_COLLECTION, TEMPLATE_WHERE, build_once

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def sim_repo(tmp_path_factory) -> Path:
    """The ``test`` preset simulated into a repository (collection 2.2i/defaults/test)."""
    import dataclasses
    import json

    from diapipe.sim.simulate import simulate_repo

    def build(path):
        summary = simulate_repo(path, "test", seed=SIM_SEED, jobs=2, progress=lambda message: None)
        Path(f"{path}.summary.json").write_text(json.dumps(dataclasses.asdict(summary)))

    return build_once(tmp_path_factory, "sim_repo", build)




@pytest.fixture(scope="session")
def template_repo(sim_repo, tmp_path_factory) -> Path:
    """``sim_repo`` after ApTemplate.yaml (output collection ``u/test/templates``)."""
    from diapipe.pipelines import run_pipeline

    def build(marker):
        run_pipeline(
            sim_repo,
            "ApTemplate.yaml",
            inputs=["2.2i/defaults/test"],
            output=TEMPLATE_COLLECTION,
            # templates from the first (template-epoch) season only: a science visit inside its own
            # template would cancel part of its noise and flatter every difference-imaging metric
            where=TEMPLATE_WHERE,
        )

    build_once(tmp_path_factory, "template_run", build)
    return sim_repo


@pytest.fixture(scope="session")
def template_all_repo(template_repo, tmp_path_factory) -> Path:
    """``template_repo`` plus ApTemplate over every visit, as the guide runs it
    (output ``u/test/templates_all``): science visits with transients go into the
    template, so outlier rejection has something to reject."""
    from diapipe.pipelines import run_pipeline
    from testing_helpers import TEMPLATE_ALL_COLLECTION

    def build(marker):
        run_pipeline(
            template_repo,
            "ApTemplate.yaml",
            inputs=["2.2i/defaults/test"],
            output=TEMPLATE_ALL_COLLECTION,
            where="skymap='DC2' AND tract=3828 AND patch=24 AND band='g'",
        )

    build_once(tmp_path_factory, "template_all_run", build)
    return template_repo
