"""Coadds: resampling onto patch grids (warps) and stacking them (assembleCoadd)."""

from .assemble import assemble_coadd, coadd_psf, find_artifacts, input_weights, max_artifact_epochs
from .warp import lanczos_weights, local_affine, pixel_mapping, warp_image, warp_psf

__all__ = [
    "assemble_coadd",
    "coadd_psf",
    "find_artifacts",
    "input_weights",
    "lanczos_weights",
    "local_affine",
    "max_artifact_epochs",
    "pixel_mapping",
    "warp_image",
    "warp_psf",
]
