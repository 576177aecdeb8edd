"""Locate diapipe's pipelines and run them in-process (for tests and scripts).

Users run them with ``pipetask`` as the guide does; `run_pipeline` is the
same execution inside one Python process (pipe_base's SimplePipelineExecutor),
without the per-quantum process start-up of ``pipetask -j``.
"""

from __future__ import annotations

import os
from importlib import resources

__all__ = ["ap_pipe_dir", "pipeline_path", "run_pipeline"]


def ap_pipe_dir() -> str:
    """The folder exported as ``AP_PIPE_DIR``."""
    return str(resources.files("diapipe") / "ap_pipe")


def pipeline_path(name: str) -> str:
    """``$AP_PIPE_DIR/pipelines/LsstCamImSim/<name>`` (name with or without ``.yaml``)."""
    if not name.endswith(".yaml"):
        name += ".yaml"
    path = os.path.join(ap_pipe_dir(), "pipelines", "LsstCamImSim", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no pipeline {name!r} in {os.path.dirname(path)}")
    return path


def run_pipeline(repo, pipeline: str, *, inputs, output: str, where: str = "", config_overrides=None):
    """Build and run a pipeline in this process; returns the executed quanta.

    ``pipeline`` is a file path or the name of one of ours (``ApTemplate.yaml``),
    optionally with a ``#label,...`` or ``#subset`` suffix as pipetask accepts.
    ``config_overrides`` maps ``label`` to ``{field: value}``.
    """
    from lsst.pipe.base import Pipeline
    from lsst.pipe.base.simple_pipeline_executor import SimplePipelineExecutor

    os.environ.setdefault("AP_PIPE_DIR", ap_pipe_dir())
    location, _, labels = pipeline.partition("#")
    path = location if os.path.exists(location) else pipeline_path(location)
    butler = SimplePipelineExecutor.prep_butler(str(repo), inputs=list(inputs), output=output)
    pipe = Pipeline.from_uri(f"{path}#{labels}" if labels else path)
    for label, fields in (config_overrides or {}).items():
        for field, value in fields.items():
            pipe.addConfigOverride(label, field, value)
    executor = SimplePipelineExecutor.from_pipeline(pipe, where=where, butler=butler)
    return executor.run(register_dataset_types=True)
