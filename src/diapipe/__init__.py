"""diapipe: Rubin-style Alert Production on the Rubin Gen3 middleware from PyPI.

Notebook-facing functions are importable from the top level; they load
lazily so that ``import diapipe`` stays cheap for every pipetask quantum.

>>> import diapipe
>>> callable(diapipe.dia_object_summary)
True
"""

from __future__ import annotations

from ._lazy import lazy_exports

__all__ = ["__version__", "dia_object_summary", "forced_psf_flux", "Exposure", "PixelPsf"]
__version__ = "0.1.0"

_LAZY = {
    "dia_object_summary": "association.summary",
    "forced_psf_flux": "association.forced",
    "Exposure": "exposure.exposure",
    "PixelPsf": "exposure.psf",
}


__getattr__ = lazy_exports(__name__, _LAZY)

def __dir__():
    return sorted(list(globals()) + list(_LAZY))
