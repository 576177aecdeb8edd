"""Shared fixtures for the simulator's repository tests.

The ``test`` preset is simulated ONCE per session (about 30 s on 2 cores) and every
test of ``test_simulate.py`` reads that repository; tests that need to write
simulate their own much smaller preset (`tiny_preset`).
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest

from diapipe.sim.presets import get_preset

#: seed of the shared repository (the CLI's default)
SIM_SEED = 1


@pytest.fixture(scope="session")
def sim_repo(tmp_path_factory):
    """The ``test`` preset simulated into a fresh repository with two worker processes.

    Returns a namespace: ``path``, ``summary`` (`SimulationSummary`), ``preset``,
    ``butler`` (read-only `Butler`), ``seed``.
    """
    from lsst.daf.butler import Butler

    from diapipe.sim.simulate import simulate_repo

    path = os.fspath(tmp_path_factory.mktemp("sim") / "repo")
    summary = simulate_repo(path, "test", seed=SIM_SEED, jobs=2, progress=lambda message: None)
    return SimpleNamespace(
        path=path,
        summary=summary,
        preset=get_preset("test"),
        butler=Butler.from_config(path),
        seed=SIM_SEED,
    )


@pytest.fixture(scope="session")
def tiny_preset():
    """The ``test`` preset cut to a 400 x 200 px detector and 2 + 1 visits (a few seconds)."""
    return dataclasses.replace(
        get_preset("test"),
        name="tiny",
        amp_data_shape=(100, 50),
        n_template_visits=2,
        n_science_visits=1,
        collection="2.2i/defaults/tiny",
    )
