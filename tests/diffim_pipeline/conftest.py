"""Session fixture for the ApPipe difference-imaging tests: ``template_repo`` plus one
run of ``ApPipe.yaml#diffim`` (no diaPipe, so no APDB), shared across xdist workers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testing_helpers import build_once

DIFFIM_COLLECTION = "u/test/diffim"
INPUTS = ("u/test/templates", "2.2i/defaults/test")
WHERE = "skymap='DC2' AND band='g'"


def run_diffim(repo, output, *, config_overrides=None, where=WHERE):
    """Run ``LsstCamImSim/ApPipe.yaml#diffim`` in-process; returns the executed quanta.

    (`diapipe.pipelines.run_pipeline` does not take the ``#subset`` syntax.)
    """
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    from diapipe.pipelines import ap_pipe_dir, pipeline_path

    os.environ.setdefault("AP_PIPE_DIR", ap_pipe_dir())
    butler = SimplePipelineExecutor.prep_butler(str(repo), inputs=list(INPUTS), output=output)
    pipe = Pipeline.from_uri(pipeline_path("ApPipe.yaml") + "#diffim")
    for label, fields in (config_overrides or {}).items():
        for field, value in fields.items():
            pipe.addConfigOverride(label, field, value)
    executor = SimplePipelineExecutor.from_pipeline(pipe, where=where, butler=butler)
    return executor.run(register_dataset_types=True)


@pytest.fixture(scope="session")
def diffim_repo(template_repo, tmp_path_factory) -> Path:
    """``template_repo`` after ApPipe.yaml#diffim on every g visit (collection ``u/test/diffim``)."""
    build_once(tmp_path_factory, "diffim_run", lambda marker: run_diffim(template_repo, DIFFIM_COLLECTION))
    return template_repo
