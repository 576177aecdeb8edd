"""Exceptions of diapipe, and which to raise when.

- Bad input data (a corrupt or NaN raw, an image from another instrument):
  `BadInputError`. The quantum fails with a message naming the data ID; the
  rest of the run goes on (pipetask runs independent quanta regardless).
- A legitimate skip (too little template coverage): `lsst.pipe.base.NoWorkFound`.
- An algorithm that could not reach a result on valid data (too few kernel
  sources, astrometry that does not converge): a subclass of
  `DiapipeAlgorithmError`, constructed with the measured value and the
  threshold, which pipe_base records as task metadata.
- Misconfiguration: raise from the config's ``validate()`` (a
  `lsst.pex.config.FieldValidationError` names the field).

Always ``raise ... from err`` so the cause stays visible.
"""

from __future__ import annotations

from lsst.pipe.base import AlgorithmError, RepeatableQuantumError

__all__ = ["BadInputError", "DiapipeAlgorithmError", "TooFewSourcesError", "data_id_str", "naming_data_id"]


def data_id_str(data_id) -> str:
    """A data ID as ``key=value, ...`` for error messages (required keys only)."""
    try:
        mapping = data_id.required
    except AttributeError:
        mapping = data_id
    return ", ".join(f"{k}={v}" for k, v in dict(mapping).items())


class BadInputError(RepeatableQuantumError):
    """An input dataset that cannot be processed (corrupt, NaN, wrong instrument)."""


class DiapipeAlgorithmError(AlgorithmError):
    """An algorithm failed on valid data; carries what was measured and the limit."""

    def __init__(self, message: str, *, measured=None, threshold=None, **extra):
        super().__init__(message)
        self._metadata = {"message": message}
        if measured is not None:
            self._metadata["measured"] = measured
        if threshold is not None:
            self._metadata["threshold"] = threshold
        self._metadata.update(extra)

    @property
    def metadata(self):
        return self._metadata


class TooFewSourcesError(DiapipeAlgorithmError):
    """Fewer usable sources than a fit needs (PSF, astrometry, kernel)."""


def naming_data_id(err: DiapipeAlgorithmError, label: str, data_id) -> DiapipeAlgorithmError:
    """``err`` again, its message prefixed by the task label and the quantum's data ID
    (pipetask logs the data ID on another line; the reason should carry it too).
    Raise it ``from err``."""
    where = data_id_str(data_id)
    return type(err)(f"{label} for {{{where}}}: {err}",
                     **{k: v for k, v in err.metadata.items() if k != "message"}, dataId=where)
