"""Coadds: resampling onto patch grids (warps) and stacking them (assembleCoadd)."""

from .._lazy import lazy_exports

# Lazy: the task modules import this package; assemble.py pulls in scipy.ndimage.
_ASSEMBLE = ("assemble_coadd", "coadd_psf", "find_artifacts", "input_weights", "max_artifact_epochs")
_WARP = ("lanczos_weights", "local_affine", "pixel_mapping", "warp_image", "warp_psf")
__getattr__ = lazy_exports(__name__, {**dict.fromkeys(_ASSEMBLE, "assemble"), **dict.fromkeys(_WARP, "warp")})

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
