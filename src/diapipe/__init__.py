"""diapipe: Rubin-style Alert Production on the Rubin Gen3 middleware from PyPI.

Notebook-facing functions are importable from the top level; they load
lazily so that ``import diapipe`` stays cheap for every pipetask quantum.

>>> import diapipe
>>> callable(diapipe.dia_object_summary)
True
"""

from __future__ import annotations

import importlib

__all__ = ["__version__", "dia_object_summary", "forced_psf_flux", "Exposure", "PixelPsf"]
__version__ = "0.1.0"

_LAZY = {
    "dia_object_summary": "diapipe.association.summary",
    "forced_psf_flux": "diapipe.association.forced",
    "Exposure": "diapipe.exposure.exposure",
    "PixelPsf": "diapipe.exposure.psf",
}


def __getattr__(name):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'diapipe' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
