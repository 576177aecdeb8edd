"""The walkthrough run, shared by the doc test and the notebook test.

``walkthrough_run`` runs every command block of docs/walkthrough.md once per
session (across pytest-xdist workers, through a file lock) on the ``test``
preset, in a temporary directory, and returns where it ran and how long it took.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from testing_helpers import build_once

#: the doc's work directory, relative to where its first command runs
WORK = "dc2-work"
#: a hard stop, far above the ~4-5 minutes the doc takes on 2 shared cores
TIMEOUT_S = 1200


def load_doc_blocks():
    """The extractor module (test folders are not packages: loaded by path, once)."""
    name = "_walkthrough_doc_blocks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_doc_blocks.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def doc_env() -> dict:
    """The user's shell after the doc's set-up block: venv on PATH, `diapipe env` exported."""
    prefix = sys.prefix
    env = dict(os.environ)
    env.update(
        PATH=os.path.join(prefix, "bin") + os.pathsep + env.get("PATH", ""),
        VIRTUAL_ENV=prefix,
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
    )
    return env


@dataclass(frozen=True)
class WalkthroughRun:
    """Where the doc ran: ``root`` (the user's starting directory) and ``work`` (its dc2-work)."""

    root: Path
    seconds: float

    @property
    def work(self) -> Path:
        return self.root / WORK

    @property
    def repo(self) -> Path:
        return self.work / "repo"


@pytest.fixture(scope="session")
def walkthrough_run(tmp_path_factory) -> WalkthroughRun:
    blocks = load_doc_blocks()

    def build(root: Path):
        root.mkdir(parents=True, exist_ok=True)
        # the skipped set-up block's `eval "$(diapipe env)"`: the venv is the one pytest runs in
        script = blocks.bash_script(blocks.DOC.read_text(), preamble='eval "$(diapipe env)"')
        (root / "walkthrough.sh").write_text(script)
        started = time.monotonic()
        with open(root / "walkthrough.log", "w") as log:
            result = subprocess.run(
                ["bash", str(root / "walkthrough.sh")],
                cwd=root,
                env=doc_env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=TIMEOUT_S,
                check=False,
            )
        seconds = time.monotonic() - started
        (root / "walkthrough.seconds").write_text(f"{seconds:.1f}")
        if result.returncode != 0:
            tail = (root / "walkthrough.log").read_text()[-6000:]
            raise AssertionError(f"docs/walkthrough.md failed (exit {result.returncode}) in {root}:\n{tail}")

    root = build_once(tmp_path_factory, "walkthrough", build)
    return WalkthroughRun(root=root, seconds=float((root / "walkthrough.seconds").read_text()))
