"""Session-wide fixtures: one simulated repository and one run of each
pipeline, shared by every test (and every pytest-xdist worker, through a
file lock), because simulating and processing cost minutes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def _shared_dir(tmp_path_factory) -> Path:
    # the parent of the per-worker base temp is common to all xdist workers
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root


def _once(tmp_path_factory, name, build):
    """Run ``build(path)`` once per test session (across workers); return path."""
    from filelock import FileLock

    root = _shared_dir(tmp_path_factory)
    path = root / name
    done = root / f"{name}.done"
    failed = root / f"{name}.failed"
    with FileLock(str(root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"building shared fixture {name} failed earlier in this session: {failed.read_text()}")
        if not done.exists():
            try:
                build(path)
            except BaseException as err:
                failed.write_text(repr(err))
                raise
            done.write_text("ok")
    return path


@pytest.fixture(scope="session")
def sim_repo(tmp_path_factory) -> Path:
    """The ``test`` preset simulated into a repository (collection 2.2i/defaults/test)."""
    from diapipe.sim.simulate import simulate_repo

    return _once(tmp_path_factory, "sim_repo", lambda path: simulate_repo(path, "test", seed=1, jobs=1))


TEMPLATE_COLLECTION = "u/test/templates"
APPIPE_COLLECTION = "u/test/appipe"


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
            where="skymap='DC2' AND tract=3828 AND patch=24 AND band='g'",
        )

    _once(tmp_path_factory, "template_run", build)
    return sim_repo
