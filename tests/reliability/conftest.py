"""Fixtures of the reliability (fault-injection) suite.

Everything runs on the session's shared test-preset repository: ``sim_repo`` →
``template_repo`` (ApTemplate, ``u/test/templates``) → ``diffim_repo``
(ApPipe.yaml#diffim on every g visit, ``u/test/diffim``). The last is built
under the same `build_once` name and with the same run as
tests/diffim_pipeline/conftest.py, so a full test session builds it once for
both suites. Each test writes only to its own new collections (and its own
tmp APDB), never changes an existing one. Tests that SIGKILL pipetask run on
``kill_repo``, a clone of the registry, so a kill mid-transaction cannot
break the registry the other tests (and xdist workers) share.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _reliability import DIFFIM_COLLECTION, registry_clone, run_subset
from postgres_fixtures import postgres_server  # noqa: F401  (session fixture, reused)
from testing_helpers import build_once


@pytest.fixture(scope="session")
def diffim_repo(request, tmp_path_factory) -> Path:
    """``template_repo`` after ApPipe.yaml#diffim on every g visit (collection ``u/test/diffim``).

    For development only: ``DIAPIPE_RELIABILITY_REPO=/path/repo`` reuses a repository
    already holding ``u/test/templates`` and ``u/test/diffim`` built the same way
    (saves the ~4 minutes of simulation and processing per session).
    """
    prebuilt = os.environ.get("DIAPIPE_RELIABILITY_REPO")
    if prebuilt:
        return Path(prebuilt)
    template_repo = request.getfixturevalue("template_repo")

    def build(marker):
        # identical to tests/diffim_pipeline/conftest.py (shared build_once name)
        run_subset(
            template_repo,
            "ApPipe.yaml#diffim",
            inputs=["u/test/templates", "2.2i/defaults/test"],
            output=DIFFIM_COLLECTION,
            where="skymap='DC2' AND band='g'",
        )

    build_once(tmp_path_factory, "diffim_run", build)
    return template_repo


@pytest.fixture
def kill_repo(diffim_repo, tmp_path) -> Path:
    """``diffim_repo``'s registry copied for one test; its datastore is ``diffim_repo``'s."""
    return registry_clone(diffim_repo, tmp_path / "registry_clone")


@pytest.fixture(scope="session")
def science_visits(diffim_repo) -> list[int]:
    """The test preset's science visits (the latest ``n_science_visits`` visits)."""
    from lsst.daf.butler import Butler

    from diapipe.sim.presets import get_preset

    butler = Butler.from_config(str(diffim_repo))
    refs = butler.query_datasets("goodSeeingDiff_diaSrcTable", collections=DIFFIM_COLLECTION)
    visits = sorted({int(ref.dataId["visit"]) for ref in refs})
    n = get_preset("test").n_science_visits
    assert len(visits) >= n
    return visits[-n:]
