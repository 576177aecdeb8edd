"""``diapipe demo``: the guide, end to end, on simulated DC2-like data.

Each step is the command a user would type (shown as it runs), executed in a
subprocess with the same environment the guide assumes (``AP_PIPE_DIR``).
Progress goes to the terminal; each step's full output to ``WORKDIR/logs``.

Reruns are explicit: the default resumes after the last completed step (an
interrupted step is undone first: its output collection or APDB is removed),
``--fresh`` deletes the work directory and starts clean. A work directory
made for another preset or seed is never mixed: that is an error.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["DemoError", "Step", "demo_steps", "run_demo", "MY_APPIPE_TEMPLATE"]

STATE_FILE = "demo_state.json"
TEMPLATE_OUTPUT = "u/demo/templates"
APPIPE_OUTPUT = "u/demo/appipe"

#: the guide's user pipeline file, importing ApPipe.yaml and setting the APDB
MY_APPIPE_TEMPLATE = """\
description: My very own AP pipeline for LsstCam-imSim

instrument: diapipe.instrument.LsstCamImSim
imports:
- location: $AP_PIPE_DIR/pipelines/LsstCamImSim/ApPipe.yaml

tasks:
  diaPipe:
    class: diapipe.association.tasks.DiaPipelineTask
    config:
      apdb.isolation_level: READ_UNCOMMITTED
      apdb.db_url: '{db_url}'
"""


class DemoError(RuntimeError):
    """A demo step failed, or the work directory belongs to another run."""


@dataclass
class Step:
    """One command of the walkthrough."""

    name: str
    argv: list[str]
    #: collections or files to remove before retrying an interrupted step
    undo_collections: list[str] = field(default_factory=list)
    undo_paths: list[str] = field(default_factory=list)
    #: show the full output (short queries) rather than a progress line
    show_output: bool = False
    #: earlier steps to redo too when this one was interrupted (e.g. the APDB it filled)
    redo_with: list[str] = field(default_factory=list)
    #: folders the command expects to exist (as the guide's user has a working directory)
    make_dirs: list[str] = field(default_factory=list)
    #: write stdout to this file (e.g. `dot -Tpng > x.png`)
    stdout_path: str | None = None

    def shell(self) -> str:
        """The command as a user types it (programs by name, the guide's quoting)."""
        words = [os.path.basename(self.argv[0])] + [_display_quote(a) for a in self.argv[1:]]
        text = " ".join(words)
        from .pipelines import ap_pipe_dir

        text = text.replace(ap_pipe_dir(), "$AP_PIPE_DIR")
        return f"{text} > {shlex.quote(self.stdout_path)}" if self.stdout_path else text


def _display_quote(arg: str) -> str:
    # the guide writes -d "skymap='DC2' AND band='g'": double quotes around single ones
    if arg and not any(c in arg for c in " '\"$`\\*?()<>|;&"):
        return arg
    if '"' not in arg and "$" not in arg and "`" not in arg and "\\" not in arg:
        return f'"{arg}"'
    return shlex.quote(arg)


def _bin(name: str) -> str:
    path = os.path.join(sys.prefix, "bin", name)
    return path if os.path.exists(path) else name


def _available(name: str) -> bool:
    return os.path.exists(os.path.join(sys.prefix, "bin", name)) or shutil.which(name) is not None


def demo_steps(workdir: str, preset: str, seed: int, jobs: int, pipetask_jobs: int = 1) -> list[Step]:
    """The guide's commands for this work directory, in order."""
    from .pipelines import ap_pipe_dir
    from .sim.presets import get_preset

    collection = get_preset(preset).collection
    repo = os.path.join(workdir, "repo")
    pipelines = os.path.join(ap_pipe_dir(), "pipelines", "LsstCamImSim")
    tract, patches = get_preset(preset).tract, get_preset(preset).patches
    patch_clause = f"patch={patches[0]}" if len(patches) == 1 else f"patch IN ({', '.join(map(str, patches))})"
    steps = [
        Step("simulate the data set", [_bin("diapipe"), "simulate", repo, "--preset", preset, "--seed", str(seed), "-j", str(jobs)],
             undo_paths=[repo]),
        Step("see the collections", [_bin("butler"), "query-collections", repo, "--chains=tree", "2.2i/defaults"],
             show_output=True),
        Step("see the data IDs", [_bin("butler"), "query-data-ids", repo, "tract", "patch", "visit",
                                  f"--collections={collection}", "--where",
                                  "skymap='DC2' AND band='g' AND instrument='LSSTCam-imSim'", "--datasets", "raw"],
             show_output=True),
        Step("draw ApTemplate.yaml", [_bin("pipetask"), "build", "-p", os.path.join(pipelines, "ApTemplate.yaml"),
                                      "--pipeline-dot", os.path.join(workdir, "ApTemplate.dot")]),
    ]
    if _available("dot"):
        steps.append(Step("render it", ["dot", os.path.join(workdir, "ApTemplate.dot"), "-Tpng"],
                          stdout_path=os.path.join(workdir, "ApTemplate.png")))
    steps.append(
        Step("build templates (ApTemplate.yaml)",
             [_bin("pipetask"), "run", "-j", str(pipetask_jobs), "-b", repo, "-d",
              f"skymap='DC2' AND tract={tract} AND {patch_clause} AND band='g' "
              f"AND day_obs < {get_preset(preset).template_season_day_obs}", "-i", "2.2i/defaults",
              "-o", TEMPLATE_OUTPUT, "-p", os.path.join(pipelines, "ApTemplate.yaml"), "--register-dataset-types"],
             undo_collections=[TEMPLATE_OUTPUT])
    )
    apdb_dir = os.path.join(workdir, "apdb")
    db_path = os.path.join(apdb_dir, "run1.db")
    my_pipeline = os.path.join(workdir, "My-DC2-ApPipe.yaml")
    steps += [
        Step("make an empty APDB",
             [_bin("make_apdb.py"), "-c", "isolation_level=READ_UNCOMMITTED", "-c", f"db_url=sqlite:///{db_path}"],
             undo_paths=[apdb_dir], make_dirs=[apdb_dir]),
        Step("draw My-DC2-ApPipe.yaml", [_bin("pipetask"), "build", "-p", my_pipeline,
                                        "--pipeline-dot", os.path.join(workdir, "My-DC2-ApPipe.dot")]),
    ]
    if _available("dot"):
        steps.append(Step("render it", ["dot", os.path.join(workdir, "My-DC2-ApPipe.dot"), "-Tpng"],
                          stdout_path=os.path.join(workdir, "My-DC2-ApPipe.png")))
    steps += [
        Step("difference imaging and association (My-DC2-ApPipe.yaml)",
             [_bin("pipetask"), "run", "-j", str(pipetask_jobs), "-b", repo, "-d", "skymap='DC2' AND band='g'",
              "-i", f"{TEMPLATE_OUTPUT},{collection}", "-o", APPIPE_OUTPUT, "-p", my_pipeline,
              "--register-dataset-types"],
             undo_collections=[APPIPE_OUTPUT], redo_with=["make an empty APDB"]),
        Step("see the DIA source tables",
             [_bin("butler"), "query-data-ids", repo, "visit", "detector", f"--collections={APPIPE_OUTPUT}",
              "--where", "skymap='DC2' AND band='g' AND instrument='LSSTCam-imSim'",
              "--datasets", "goodSeeingDiff_diaSrcTable"],
             show_output=True),
        Step("measure against truth (diapipe metrics)",
             [_bin("diapipe"), "metrics", repo, "-c", APPIPE_OUTPUT, "-c", TEMPLATE_OUTPUT,
              "--apdb", db_path, "--json", os.path.join(workdir, "metrics.json")],
             show_output=True),
        Step("write the report (diapipe report)",
             [_bin("diapipe"), "report", repo, "-c", APPIPE_OUTPUT, "-c", TEMPLATE_OUTPUT, "--apdb", db_path,
              "--metrics", os.path.join(workdir, "metrics.json"), "-o", os.path.join(workdir, "report")],
             undo_paths=[os.path.join(workdir, "report")], show_output=True),
    ]
    return steps


# ---------------------------------------------------------------------------
def _write_user_pipeline(workdir, say) -> str:
    """The guide's My-DC2-ApPipe.yaml, pointing at the demo's APDB."""
    path = os.path.join(workdir, "My-DC2-ApPipe.yaml")
    db_url = f"sqlite:///{os.path.join(workdir, 'apdb', 'run1.db')}"
    text = MY_APPIPE_TEMPLATE.format(db_url=db_url)
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as stream:
            stream.write(text)
        say(f"Wrote {path} (the guide's user pipeline, importing ApPipe.yaml and setting the APDB):")
        for line in text.splitlines():
            say("  | " + line)
    return path


def _load_state(workdir):
    path = os.path.join(workdir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as stream:
        return json.load(stream)


def _save_state(workdir, state):
    tmp = os.path.join(workdir, STATE_FILE + ".tmp")
    with open(tmp, "w") as stream:
        json.dump(state, stream, indent=2)
    os.replace(tmp, os.path.join(workdir, STATE_FILE))


def _undo(step: Step, repo: str, say) -> None:
    """Remove what an interrupted step may have half-written."""
    for path in step.undo_paths:
        if os.path.exists(path):
            say(f"   undoing the interrupted step: removing {path}")
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if step.undo_collections and os.path.exists(os.path.join(repo, "butler.yaml")):
        from lsst.daf.butler import Butler, CollectionType, MissingCollectionError

        butler = Butler.from_config(repo, writeable=True)
        for name in step.undo_collections:
            try:
                kind = butler.registry.getCollectionType(name)
            except MissingCollectionError:
                continue
            say(f"   undoing the interrupted step: removing collection {name}")
            runs = list(butler.registry.getCollectionChain(name)) if kind == CollectionType.CHAINED else [name]
            if kind == CollectionType.CHAINED:
                butler.registry.removeCollection(name)
            butler.removeRuns([r for r in runs if butler.registry.getCollectionType(r) == CollectionType.RUN])


_PROGRESS = re.compile(r"Executed (\d+) quanta successfully, (\d+) failed and (\d+) remain out of total (\d+) quanta")


def _run_step(index, total, step: Step, log_path, env, say, started) -> None:
    say(f"\n[{index}/{total}] {step.name}  ({time.monotonic() - started:.0f} s elapsed)")
    say(f"$ {step.shell()}")
    with open(log_path, "w") as log:
        out = open(step.stdout_path, "wb") if step.stdout_path else None
        try:
            process = subprocess.Popen(
                step.argv,
                stdout=out if out else subprocess.PIPE,
                stderr=subprocess.STDOUT if not out else log,
                env=env,
                text=not bool(out),
            )
            last = ""
            shown = 0
            interactive = sys.stdout.isatty()
            if not out:
                for line in process.stdout:
                    log.write(line)
                    if "Unable to import eups" in line or "warnings.warn(" in line:
                        continue
                    if step.show_output:
                        say("  " + line.rstrip())
                        continue
                    match = _PROGRESS.search(line)
                    if match:
                        done, failed, _, n = (int(g) for g in match.groups())
                        bar = "#" * int(30 * (done + failed) / max(n, 1))
                        last = f"  [{bar:<30}] {done + failed}/{n} quanta ({failed} failed) {time.monotonic() - started:.0f} s"
                        if interactive:
                            say(last, end="\r")
                        elif (done + failed) * 10 // max(n, 1) != shown * 10 // max(n, 1) or done + failed == n:
                            say(last)
                        shown = done + failed
                    elif line.startswith(("Simulated", "  [", "rendering", "sky:", "creating", "writing")):
                        say("  " + line.rstrip())
            code = process.wait()
        finally:
            if out:
                out.close()
    if last and sys.stdout.isatty():
        say("")
    if code != 0:
        raise DemoError(f"step '{step.name}' failed (exit {code}); its output is in {log_path}")


def run_demo(workdir: str = "demo_work", preset: str = "ci_imsim", *, seed: int = 1, jobs: int = 2,
             pipetask_jobs: int = 1, fresh: bool = False, say=None) -> dict:
    """Run (or resume) the walkthrough in ``workdir``; returns the state dict."""
    from .pipelines import ap_pipe_dir

    say = say or (lambda text, end="\n": print(text, end=end, flush=True))
    workdir = os.path.abspath(workdir)
    if fresh and os.path.exists(workdir):
        say(f"--fresh: removing {workdir}")
        shutil.rmtree(workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    state = _load_state(workdir)
    if state is None:
        state = {"preset": preset, "seed": seed, "completed": [], "started": None}
    elif state["preset"] != preset or state["seed"] != seed:
        raise DemoError(
            f"{workdir} holds a demo of preset {state['preset']} seed {state['seed']}; "
            f"use --fresh to start over with preset {preset} seed {seed}, or another --workdir"
        )
    steps = demo_steps(workdir, preset, seed, jobs, pipetask_jobs)
    env = dict(os.environ, AP_PIPE_DIR=ap_pipe_dir(), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env["PATH"] = os.path.join(sys.prefix, "bin") + os.pathsep + env.get("PATH", "")
    started = time.monotonic()
    done = [s for s in steps if s.name in state["completed"]]
    if done:
        say(f"Resuming the demo in {workdir}: {len(done)} of {len(steps)} steps already done (--fresh starts over)")
    else:
        say(f"diapipe demo: the guide end to end, preset {preset}, in {workdir}")
    repo = os.path.join(workdir, "repo")
    _write_user_pipeline(workdir, say)
    by_name = {step.name: step for step in steps}
    running = state.get("running")
    if running in by_name:
        # an interrupted step is redone from scratch, with the earlier steps it filled
        for name in by_name[running].redo_with:
            if name in state["completed"]:
                state["completed"].remove(name)
                _undo(by_name[name], repo, say)
        _undo(by_name[running], repo, say)
    for index, step in enumerate(steps, start=1):
        if step.name in state["completed"]:
            continue
        state["running"] = step.name
        _save_state(workdir, state)
        log_path = os.path.join(workdir, "logs", f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', step.name.lower()).strip('-')}.log")
        for folder in step.make_dirs:
            os.makedirs(folder, exist_ok=True)
        _run_step(index, len(steps), step, log_path, env, say, started)
        state["completed"].append(step.name)
        state.pop("running", None)
        _save_state(workdir, state)
    say(f"\nDone in {time.monotonic() - started:.0f} s. Repository: {repo}")
    return state
