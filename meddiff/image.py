"""``Image``: a voxel array with its geometry, modality and (identifier-free) metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import nibabel as nib
import numpy as np

from meddiff.errors import MeddiffError

# DICOM attributes that may travel with an image. An allow-list, so that nothing identifying
# (names, IDs, dates, institutions, UIDs) can slip into ``meta`` and from there into files or logs.
SAFE_META_KEYS = (
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "BodyPartExamined",
    "SOPClassName",
    "PhotometricInterpretation",
    "RescaleType",
    "WindowCenter",
    "WindowWidth",
    "KVP",
    "SliceThickness",
    "RepetitionTime",
    "EchoTime",
    "InversionTime",
    "FlipAngle",
    "ImageType",
    "NumberOfFrames",
)


@dataclass
class Image:
    """A medical image in physical space.

    ``array`` is float32 with voxel axes (i, j, k[, t]) as nibabel orders them; ``affine`` maps voxel
    indices to RAS+ millimetres (4x4, nibabel convention). 2D images have two axes and still a 4x4
    affine. ``modality`` is a DICOM code (MR, CT, CR, DX, ...) or None when unknown.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array, dtype=np.float32)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise MeddiffError(f"affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim not in (2, 3, 4):
            raise MeddiffError(f"an image has 2, 3 or 4 axes, got shape {self.array.shape}")
        unsafe = [k for k in self.meta if k not in SAFE_META_KEYS]
        if unsafe:
            raise MeddiffError(f"meta keys {unsafe} are not on the identifier-free allow-list")

    @property
    def spatial_ndim(self) -> int:
        """Spatial axes: 2 for a slice, 3 for a volume or a time series of volumes (4D)."""
        return min(self.array.ndim, 3)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial axis (column norms of the affine)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(s) for s in norms[: self.spatial_ndim])

    @property
    def orientation(self) -> str:
        """Anatomical direction of each voxel axis, e.g. ``RAS`` or ``LPS`` (nibabel axcodes)."""
        return "".join(nib.aff2axcodes(self.affine))[: self.spatial_ndim]

    @property
    def grid(self) -> str:
        """The voxel grid in words, for messages that compare two: shape, spacing, origin and orientation."""
        return grid_words(self.array.shape[: self.spatial_ndim], self.affine)

    def check_finite(self) -> Image:
        """Raise a clear error for empty arrays or NaN/inf values; return self for chaining."""
        if self.array.size == 0:
            raise MeddiffError(f"image is empty (shape {self.array.shape})")
        if not np.isfinite(self.array).all():
            bad = int((~np.isfinite(self.array)).sum())
            raise MeddiffError(f"image has {bad} NaN or infinite voxels — fix or mask them first")
        return self


def grid_words(shape: tuple[int, ...], affine: np.ndarray) -> str:
    """``256 x 256 voxels of 0.9 x 0.9 mm, origin (-120, -120, 0) mm, RAS``: a grid named so two can be told apart."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[: len(shape)]
    origin = ", ".join(f"{v:.4g}" for v in affine[:3, 3])
    axes = "".join(nib.aff2axcodes(affine))[: len(shape)]
    return (f"{' x '.join(map(str, shape))} voxels of {' x '.join(f'{v:.4g}' for v in spacing)} mm, "
            f"origin ({origin}) mm, {axes}")
