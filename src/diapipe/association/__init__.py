"""Association of DiaSources with DiaObjects, DiaObject summaries, forced photometry.

Pure algorithms on pandas/numpy: the diaPipe task wraps them with APDB I/O.
"""

from .forced import forced_psf_flux
from .match import AssociationResult, assign_dia_object_ids, associate, new_dia_object_ids
from .summary import dia_object_summary

__all__ = [
    "AssociationResult",
    "associate",
    "assign_dia_object_ids",
    "new_dia_object_ids",
    "dia_object_summary",
    "forced_psf_flux",
]
