"""Accuracy metrics of diapipe's outputs against the simulator's truth (ap_verify-style).

`single_frame` (ISR, PSF, astrometry, photometry of calexps), `template` (the coadd),
`truth_match` (matching and truth-based pixel selections), `metrics` (the aggregate,
table, per-task run times and the ``diapipe metrics`` command).
"""

from .._lazy import lazy_exports

__all__ = ["compute_metrics", "format_table", "metrics_main"]


# lazy: importing the package must not pull in the butler or matplotlib
__getattr__ = lazy_exports(__name__, {name: "metrics" for name in __all__})
