"""Shared fixtures for the simulator's repository tests.

The ``test`` preset is simulated ONCE per session (about 30 s on 2 cores) and every
test of ``test_simulate.py`` reads that repository; tests that need to write
simulate their own much smaller preset (`tiny_preset`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from diapipe.sim.presets import get_preset

from testing_helpers import SIM_SEED


@pytest.fixture(scope="session")
def sim_repo(sim_repo):
    """The session's ``test``-preset repository (tests/conftest.py), as a namespace:
    ``path``, ``summary`` (the `SimulationSummary` fields), ``preset``, ``butler``
    (read-only `Butler`), ``seed``."""
    from lsst.daf.butler import Butler

    summary = json.loads(Path(f"{sim_repo}.summary.json").read_text())
    return SimpleNamespace(
        path=os.fspath(sim_repo),
        summary=SimpleNamespace(**summary),
        preset=get_preset("test"),
        butler=Butler.from_config(os.fspath(sim_repo)),
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
