"""Association of DiaSources with DiaObjects, DiaObject summaries, forced photometry.

Pure algorithms on pandas/numpy: the diaPipe task wraps them with APDB I/O.
"""

from .._lazy import lazy_exports

# Lazy: diaPipe's task module imports this package, and match.py pulls in scipy.optimize.
__getattr__ = lazy_exports(
    __name__,
    {
        "forced_psf_flux": "forced",
        "AssociationResult": "match",
        "assign_dia_object_ids": "match",
        "associate": "match",
        "new_dia_object_ids": "match",
        "dia_object_summary": "summary",
    },
)

__all__ = [
    "AssociationResult",
    "associate",
    "assign_dia_object_ids",
    "new_dia_object_ids",
    "dia_object_summary",
    "forced_psf_flux",
]
