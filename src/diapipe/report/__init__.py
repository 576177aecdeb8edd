"""``diapipe report``: a static HTML page with PNG plots of a processed repository.

`make_report` reads the butler outputs (calexp, src, goodSeeingDiff_*), the sqlite APDB,
the simulator's truth and optionally ``diapipe metrics``' JSON, and writes a folder
(``index.html``, ``style.css``, PNGs). `add_report_command` adds the subcommand to the
``diapipe`` argument parser. Modules: `inputs` (reading), `diapipe.analysis.dia_match` (truth matching
and binned fractions), `plots` (matplotlib), `sections` (what each heading shows),
`page` (HTML), `build` (the entry points).
"""

__all__ = ["add_report_command", "make_report", "report_main"]


def __getattr__(name):
    # lazy: importing the package must not pull in the butler or matplotlib
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(name)
