"""The ``diapipe`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "ap_pipe_dir"]


def ap_pipe_dir() -> str:
    """The folder exported as ``AP_PIPE_DIR``: ``$AP_PIPE_DIR/pipelines/LsstCamImSim/*.yaml``
    are the guide's pipelines."""
    from ..pipelines import ap_pipe_dir as folder

    return folder()


def _cmd_env(args) -> int:
    prefix = sys.prefix
    print(f"export AP_PIPE_DIR={ap_pipe_dir()}")
    # bps jobs run $CTRL_MPEXEC_DIR/bin/pipetask and $DAF_BUTLER_DIR/bin/butler.
    print(f"export CTRL_MPEXEC_DIR={prefix}")
    print(f"export DAF_BUTLER_DIR={prefix}")
    return 0


def _cmd_make_repo(args) -> int:
    from ..butler.repo import make_repo

    tracts = None
    if args.tracts:
        tracts = [int(t) for t in args.tracts.split(",")]
    make_repo(args.repo, tract_ids=tracts)
    print(f"Created {args.repo}: instrument LSSTCam-imSim (189 detectors), skymap DC2 (collection 'skymaps')")
    return 0


def _cmd_simulate(args) -> int:
    from ..sim.simulate import simulate_repo

    bands = args.bands.split(",") if args.bands else None
    summary = simulate_repo(args.repo, args.preset, seed=args.seed, bands=bands, jobs=args.jobs, progress=print)
    print(
        f"Simulated preset {summary.preset} into {summary.repo}: {len(summary.visits)} visits x "
        f"{len(summary.detectors)} detectors, {summary.n_sky_objects} sky objects, "
        f"{summary.n_refcat} refcat stars, in {summary.seconds:.0f} s. Collections: "
        f"{summary.collections['preset']} -> 2.2i/defaults; truth in {summary.collections['truth']}"
    )
    return 0


def _cmd_demo(args) -> int:
    from ..demo import DemoError, run_demo

    try:
        run_demo(args.workdir, args.preset, seed=args.seed, jobs=args.jobs, pipetask_jobs=args.pipetask_jobs,
                 fresh=args.fresh)
    except DemoError as err:
        print(f"diapipe demo: {err}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diapipe", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="print the shell exports the guide's commands need (AP_PIPE_DIR, ...)")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("make-repo", help="create a butler repository with LSSTCam-imSim and the DC2 skymap")
    p.add_argument("repo", help="path of the new repository")
    p.add_argument(
        "--tracts",
        default=None,
        help="comma-separated tract ids to register (default: DC2's footprint, tracts 2553-5074)",
    )
    p.set_defaults(func=_cmd_make_repo)

    from ..sim.presets import PRESETS

    p = sub.add_parser("simulate", help="simulate a DC2-like data set (raws, calibs, refcat, truth) into a repository")
    p.add_argument("repo", help="repository path (created if absent; must hold no raws yet)")
    p.add_argument("--preset", default="ci_imsim", choices=sorted(PRESETS), help="what to simulate (default ci_imsim)")
    p.add_argument("--seed", type=int, default=1, help="random seed: same seed, same pixels (default 1)")
    p.add_argument("--bands", default=None, help="comma-separated bands, overriding the preset's (e.g. g,r)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("demo", help="run the guide end to end on a simulated data set (the README's first command)")
    p.add_argument("--workdir", default="demo_work", help="work directory (default ./demo_work)")
    p.add_argument("--preset", default="ci_imsim", choices=sorted(PRESETS), help="data set (default ci_imsim)")
    p.add_argument("--seed", type=int, default=1, help="simulation seed (default 1)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="processes for the simulation (default 2)")
    p.add_argument(
        "--pipetask-jobs",
        type=int,
        default=1,
        help="pipetask -j (default 1: on small cropped detectors a quantum computes in ~1 s while each "
        "extra process pays seconds of start-up; see docs/scaling.md)",
    )
    p.add_argument("--fresh", action="store_true", help="delete the work directory first instead of resuming")
    p.set_defaults(func=_cmd_demo)

    from ..analysis.metrics import add_metrics_command

    add_metrics_command(sub)

    from ..report import add_report_command

    add_report_command(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (FileExistsError, FileNotFoundError, ValueError, LookupError, RuntimeError) as err:
        print(f"diapipe {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
