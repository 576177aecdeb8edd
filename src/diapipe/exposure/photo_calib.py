"""Photometric calibration of an exposure (`PhotoCalib`) and AB magnitude conversions.

The one home of the nJy <-> AB magnitude relation: :math:`m = 31.4 - 2.5 \\log_{10}(f / \\mathrm{nJy})`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["PhotoCalib", "njy_to_mag", "mag_to_njy", "AB_NJY_ZERO_POINT"]

#: AB magnitude of a 1 nJy source
AB_NJY_ZERO_POINT = 31.4
_AB_NJY_ZP = AB_NJY_ZERO_POINT
_LN10_04 = 0.4 * np.log(10.0)


def njy_to_mag(flux_njy, flux_err_njy=None):
    """AB magnitude (and error if ``flux_err_njy`` is given) of a flux in nJy; NaN if flux <= 0."""
    flux = np.asarray(flux_njy, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, _AB_NJY_ZP - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
        if flux_err_njy is None:
            return mag
        err = np.where(flux > 0, np.asarray(flux_err_njy, dtype=float) / (_LN10_04 * flux), np.nan)
    return mag, err


def mag_to_njy(mag):
    """Flux in nJy of an AB magnitude."""
    return 10.0 ** ((_AB_NJY_ZP - np.asarray(mag, dtype=float)) / 2.5)


@dataclasses.dataclass(frozen=True)
class PhotoCalib:
    """Flux calibration of one exposure: instrumental electrons to nJy.

    Parameters
    ----------
    calibration_mean : `float`
        nJy per electron.
    calibration_err : `float`
        Its 1σ error, nJy per electron.

    Examples
    --------
    >>> pc = PhotoCalib(calibration_mean=2.0, calibration_err=0.01)
    >>> pc.inst_flux_to_njy(100.0, 10.0, include_calibration_error=False)
    (200.0, 20.0)
    >>> round(float(pc.inst_flux_to_mag(100.0)[0]), 4)
    25.6474
    """

    calibration_mean: float
    calibration_err: float = 0.0

    def __post_init__(self):
        if not (np.isfinite(self.calibration_mean) and self.calibration_mean > 0):
            raise ValueError(f"calibration_mean must be finite and > 0, got {self.calibration_mean!r}")
        if not (np.isfinite(self.calibration_err) and self.calibration_err >= 0):
            raise ValueError(f"calibration_err must be finite and >= 0, got {self.calibration_err!r}")

    @property
    def instrumental_zero_point_mag(self) -> float:
        """AB magnitude of a source giving 1 electron: ``31.4 - 2.5 log10(calibration_mean)``."""
        return float(_AB_NJY_ZP - 2.5 * np.log10(self.calibration_mean))

    def inst_flux_to_njy(self, inst_flux, inst_flux_err=None, *, include_calibration_error: bool = True):
        """Fluxes in electrons to nJy.

        The error is :math:`\\sqrt{(c\\,\\sigma_f)^2 + (f\\,\\sigma_c)^2}` (the second term only
        with ``include_calibration_error``): well-defined for fluxes near or below zero,
        as in difference images. Returns scalars for scalar input.
        """
        flux = np.asarray(inst_flux, dtype=float)
        out = flux * self.calibration_mean
        if inst_flux_err is None:
            return out if out.ndim else float(out)
        err = np.asarray(inst_flux_err, dtype=float) * self.calibration_mean
        if include_calibration_error:
            err = np.hypot(err, flux * self.calibration_err)
        if out.ndim == 0:
            return float(out), float(err)
        return out, err

    def njy_to_inst_flux(self, flux_njy):
        """nJy to electrons (inverse of `inst_flux_to_njy`, no errors)."""
        return np.asarray(flux_njy, dtype=float) / self.calibration_mean

    def inst_flux_to_mag(self, inst_flux, inst_flux_err=None, *, include_calibration_error: bool = True):
        """Fluxes in electrons to AB magnitudes; returns ``(mag, mag_err)`` (err NaN if not given)."""
        if inst_flux_err is None:
            return njy_to_mag(self.inst_flux_to_njy(inst_flux)), np.nan
        flux, err = self.inst_flux_to_njy(inst_flux, inst_flux_err,
                                          include_calibration_error=include_calibration_error)
        return njy_to_mag(flux, err)

    @staticmethod
    def njy_to_mag(flux_njy, flux_err_njy=None):
        """AB magnitudes of nJy fluxes (see module function `njy_to_mag`)."""
        return njy_to_mag(flux_njy, flux_err_njy)

    def to_dict(self) -> dict:
        """Plain-type dict for YAML/JSON/FITS-header storage."""
        return {"calibration_mean": float(self.calibration_mean),
                "calibration_err": float(self.calibration_err)}

    @classmethod
    def from_dict(cls, data: dict) -> PhotoCalib:
        """Inverse of `to_dict`."""
        try:
            return cls(calibration_mean=float(data["calibration_mean"]),
                       calibration_err=float(data.get("calibration_err", 0.0)))
        except KeyError as err:
            raise ValueError(f"PhotoCalib dict lacks {err.args[0]!r}: {data!r}") from err
