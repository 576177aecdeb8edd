"""The ``diapipe`` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib import resources

__all__ = ["main", "ap_pipe_dir"]


def ap_pipe_dir() -> str:
    """The folder exported as ``AP_PIPE_DIR``: ``$AP_PIPE_DIR/pipelines/LsstCamImSim/*.yaml``
    are the guide's pipelines."""
    return str(resources.files("diapipe") / "ap_pipe")


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
