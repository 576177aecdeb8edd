"""``diapipe report``: a static HTML page with PNG plots of a processed repository.

`make_report` reads the butler outputs (calexp, src, goodSeeingDiff_*), the sqlite APDB,
the simulator's truth and optionally ``diapipe metrics``' JSON, and writes a folder
(``index.html``, ``style.css``, PNGs). `add_report_command` adds the subcommand to the
``diapipe`` argument parser. Modules: `inputs` (reading), `diapipe.analysis.dia_match` (truth matching
and binned fractions), `plots` (matplotlib), `sections` (what each heading shows),
`page` (HTML), `build` (the entry points).
"""

from .._lazy import lazy_exports

__all__ = ["add_report_command", "make_report", "report_main"]


# lazy: importing the package must not pull in the butler or matplotlib
__getattr__ = lazy_exports(__name__, {name: "build" for name in __all__})
