"""Accuracy metrics of diapipe's outputs against the simulator's truth (ap_verify-style).

`single_frame` (ISR, PSF, astrometry, photometry of calexps), `template` (the coadd),
`truth_match` (matching and truth-based pixel selections), `metrics` (the aggregate,
table, per-task run times and the ``diapipe metrics`` command).
"""

__all__ = ["compute_metrics", "format_table", "metrics_main"]


def __getattr__(name):
    # lazy: importing the package must not pull in the butler
    if name in __all__:
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(name)
