"""`make_report` and the ``diapipe report`` command: one folder with ``index.html``,
``style.css`` and the PNG figures, openable from disk in any browser."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

from .inputs import load_inputs
from .page import render_page

__all__ = ["add_report_command", "make_report", "report_main"]


def make_report(repo, *, collections, apdb=None, metrics_json=None, outdir="report",
                truth_collection: str = "2.2i/truth", graphs=None, band: str = "g", timings: bool = True,
                say=None) -> Path:
    """Build the HTML report of a processed repository.

    Parameters
    ----------
    repo : path-like
        Butler repository.
    collections : `str` or list of `str`
        Output collection(s) of the pipelines (ApTemplate's and ApPipe's; a chain of both
        is enough).
    apdb : path-like or `str`, optional
        The sqlite APDB: a file path, an ``sqlite:///`` URL or the APDB config YAML.
        Without it the sky and light-curve sections say so.
    metrics_json : path-like, optional
        ``diapipe metrics --json`` output: its bounds, timings and (when present)
        completeness tables are used; otherwise they are computed from the repository.
    outdir : path-like
        Report folder (created; existing report files in it are overwritten).
    graphs : list of path-like, optional
        Pipeline-graph PNGs; default: every ``X.png`` beside an ``X.dot`` in the
        repository's parent folder (the demo's work directory).
    band : `str`
        Band of the light curves' ``<band>_psfFluxMean`` ranking.
    say : callable, optional
        Progress messages (default: none).

    Returns
    -------
    pathlib.Path
        ``outdir/index.html``.
    """
    matplotlib.use("Agg", force=False)
    from . import sections as sec
    from ..analysis.dia_match import match_dia_sources_to_truth

    say = say or (lambda message: None)
    start = time.monotonic()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    say("reading the repository, the APDB and the truth")
    inputs = load_inputs(repo, collections, apdb=apdb, metrics_json=metrics_json, truth_collection=truth_collection,
                         graphs=graphs, timings=timings)
    matched = None
    if inputs.dia_src is not None and inputs.truth is not None:
        matched = match_dia_sources_to_truth(inputs.dia_src, inputs.truth)
    steps = [
        ("overview", lambda: sec.overview_section(inputs, matched)),
        ("pipeline graph", lambda: sec.graph_section(inputs, outdir)),
        ("DiaObjects on the sky", lambda: sec.sky_section(inputs, outdir)),
        ("light curves", lambda: sec.light_curve_section(inputs, outdir, band=band)),
        ("cut-outs", lambda: sec.cutout_section(inputs, outdir, matched)),
        ("completeness", lambda: sec.completeness_section(inputs, outdir, matched, say=say)),
        ("calexp astrometry and photometry", lambda: sec.single_frame_section(inputs, outdir)),
        ("task timings", lambda: sec.timing_section(inputs, outdir)),
    ]
    built = []
    for k, (name, step) in enumerate(steps, 1):
        say(f"[{k}/{len(steps)}] {name} ({time.monotonic() - start:.0f} s)")
        built.append(step())
    index = render_page(outdir, built, title="diapipe Alert Production report",
                        subtitle_lines=[f"Repository {inputs.repo} · collections {', '.join(inputs.collections)}",
                                        (f"APDB {inputs.apdb.path if inputs.apdb else '(none)'} · metrics "
                                         f"{metrics_json or '(none)'}")])
    say(f"report written to {index} in {time.monotonic() - start:.0f} s")
    return index


def _configure(parser):
    parser.add_argument("repo", help="butler repository")
    parser.add_argument("-c", "--collections", required=True, action="append",
                        help="pipeline output collection (repeatable)")
    parser.add_argument("--apdb", default=None,
                        help="sqlite APDB: file path, sqlite:/// URL or APDB config YAML")
    parser.add_argument("--metrics", default=None, help="JSON written by diapipe metrics")
    parser.add_argument("-o", "--outdir", default="report", help="report folder (default ./report)")
    parser.add_argument("--truth-collection", default="2.2i/truth")
    parser.add_argument("--graph", action="append", default=None,
                        help="pipeline-graph PNG to include (repeatable; default: X.png beside X.dot next to REPO)")
    parser.add_argument("--band", default="g", help="band of the light curves (default g)")


def _run(args) -> int:
    index = make_report(args.repo, collections=args.collections, apdb=args.apdb, metrics_json=args.metrics,
                        outdir=args.outdir, truth_collection=args.truth_collection, graphs=args.graph,
                        band=args.band, say=print)
    print(f"Open {index.resolve().as_uri()}")
    return 0


def add_report_command(subparsers) -> argparse.ArgumentParser:
    """Add ``report`` to an argparse subparsers object (``diapipe report REPO -c COLL ...``)."""
    parser = subparsers.add_parser("report", help="static HTML report with plots of a processed repository")
    _configure(parser)
    parser.set_defaults(func=_run)
    return parser


def report_main(argv=None) -> int:
    """``diapipe report`` as a standalone entry point."""
    parser = argparse.ArgumentParser(prog="diapipe report", description=__doc__.splitlines()[0])
    _configure(parser)
    return _run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(report_main())
