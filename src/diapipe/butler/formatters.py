"""Butler formatters and storage-class delegates for diapipe's own types.

The middleware ships formatters for tables (Parquet, ECSV) and plain data
(YAML, pickle); afw's image types are not on PyPI, so the exposure, the
skymap and the array-backed models (background) get theirs here. They are
declared to a repository by ``diapipe/butler/seed.yaml`` (see
`diapipe.butler.repo.make_repo`).
"""

from __future__ import annotations

import importlib
import io
from typing import Any

import numpy as np
import yaml
from lsst.daf.butler import FormatterV2, StorageClassDelegate
from lsst.resources import ResourcePath

from ..exposure.exposure import Exposure
from ..exposure.fits import COMPONENTS, read_exposure, write_exposure, write_raw

__all__ = ["ExposureFormatter", "ExposureDelegate", "SkyMapFormatter", "ArraysFormatter", "PsfFormatter"]


class ExposureFormatter(FormatterV2):
    """Multi-extension FITS exposures; components are read alone.

    Read parameter ``bbox`` = (x0, y0, width, height) in parent pixels reads
    only that part of the image planes. Datasets of type ``raw`` are written
    lean (`diapipe.exposure.fits.write_raw`: int32 RICE-compressed image and
    header, no mask or variance); reading handles both layouts.
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fit", ".fits.gz"})
    can_read_from_local_file = True
    unsupported_parameters = frozenset()

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        parameters = self.file_descriptor.parameters or {}
        bbox = parameters.get("bbox")
        return read_exposure(path, component=component, bbox=bbox)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        if not isinstance(in_memory_dataset, Exposure):
            raise TypeError(f"ExposureFormatter writes diapipe Exposure objects, not {type(in_memory_dataset)}")
        if self.dataset_ref.datasetType.nameAndComponent()[0] == "raw" and in_memory_dataset.psf is None:
            write_raw(in_memory_dataset, uri.ospath)
        else:
            write_exposure(in_memory_dataset, uri.ospath)


class ExposureDelegate(StorageClassDelegate):
    """Component access and ``bbox`` cut-outs of in-memory exposures."""

    _attribute = {
        "image": "image",
        "mask": "mask",
        "variance": "variance",
        "wcs": "wcs",
        "psf": "psf",
        "photoCalib": "photo_calib",
        "visitInfo": "visit_info",
        "metadata": "metadata",
        "bbox": "bbox",
    }

    def getComponent(self, composite: Exposure, componentName: str) -> Any:
        if componentName not in COMPONENTS:
            raise AttributeError(f"Exposure has no component {componentName!r}")
        return getattr(composite, self._attribute[componentName])

    def assemble(self, components: dict[str, Any], pytype: type | None = None) -> Exposure:
        kwargs = {self._attribute[name]: value for name, value in components.items() if name != "bbox"}
        return Exposure(**kwargs)

    def handleParameters(self, inMemoryDataset: Any, parameters=None) -> Any:
        if not parameters:
            return inMemoryDataset
        unknown = set(parameters) - {"bbox"}
        if unknown:
            raise ValueError(f"Unsupported exposure read parameters {sorted(unknown)}")
        if isinstance(inMemoryDataset, Exposure):
            return inMemoryDataset.subimage(parameters["bbox"])
        return inMemoryDataset


class SkyMapFormatter(FormatterV2):
    """A skymap is its configuration: stored as YAML, rebuilt on read."""

    default_extension = ".yaml"
    can_read_from_uri = True
    unsupported_parameters = None

    def read_from_uri(self, uri: ResourcePath, component: str | None = None, expected_size: int = -1) -> Any:
        data = yaml.safe_load(uri.read())
        if not isinstance(data, dict) or "class" not in data:
            raise ValueError(f"{uri}: not a diapipe skymap file (no 'class' key)")
        module_name, _, class_name = data["class"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        config_cls = type(cls().config)
        return cls(config_cls.from_dict(data["config"]), name=data["name"])

    def to_bytes(self, in_memory_dataset: Any) -> bytes:
        data = {
            "class": f"{type(in_memory_dataset).__module__}.{type(in_memory_dataset).__qualname__}",
            "name": in_memory_dataset.name,
            "config": in_memory_dataset.config.to_dict(),
        }
        return yaml.safe_dump(data, sort_keys=False).encode()


class ArraysFormatter(FormatterV2):
    """Objects made of named numpy arrays (``to_arrays()`` / ``from_arrays()``), as ``.npz``.

    Used for models whose state is a few arrays (e.g. a background grid):
    portable, no pickle, readable with ``numpy.load``.
    """

    default_extension = ".npz"
    can_read_from_uri = True
    unsupported_parameters = None

    def read_from_uri(self, uri: ResourcePath, component: str | None = None, expected_size: int = -1) -> Any:
        with np.load(io.BytesIO(uri.read()), allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        class_path = str(arrays.pop("__class__"))
        module_name, _, class_name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        return cls.from_arrays(arrays)

    def to_bytes(self, in_memory_dataset: Any) -> bytes:
        arrays = dict(in_memory_dataset.to_arrays())
        arrays["__class__"] = np.array(f"{type(in_memory_dataset).__module__}.{type(in_memory_dataset).__qualname__}")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()


class PsfFormatter(FormatterV2):
    """A `PixelPsf` alone (e.g. the simulator's true PSF), as a FITS cube.

    The primary HDU holds the basis (n_terms, K, K); ORDER and BBOX0..3 the
    polynomial order and the normalisation box.
    """

    default_extension = ".fits"
    can_read_from_local_file = True
    unsupported_parameters = None

    def read_from_local_file(self, path: str, component: str | None = None, expected_size: int = -1) -> Any:
        from astropy.io import fits

        from ..exposure.psf import PixelPsf

        with fits.open(path) as hdul:
            header = hdul[0].header
            return PixelPsf(
                np.array(hdul[0].data), int(header["ORDER"]), tuple(float(header[f"BBOX{i}"]) for i in range(4))
            )

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        from astropy.io import fits

        hdu = fits.PrimaryHDU(in_memory_dataset.basis)
        hdu.header["ORDER"] = in_memory_dataset.order
        for i, value in enumerate(in_memory_dataset.bbox):
            hdu.header[f"BBOX{i}"] = value
        hdu.writeto(uri.ospath, overwrite=True)
