"""What the task pipelines share about images: the axis a 2D model runs across, and model units."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from meddiff.data.transforms import CT_MODALITIES, NormalizeIntensityd
from meddiff.image import Image
from meddiff.model import ModelConfig


def slice_axis(image: Image) -> int | None:
    """The axis a 2D model runs across: a singleton axis (a 2D image stored as a volume, whatever its
    spacing), else the thickest voxel side, and among equally thick ones (isotropic voxels) the one with
    the fewest slices; None for a 2D array."""
    shape = image.array.shape
    if len(shape) == 2:
        return None
    singletons = [a for a, n in enumerate(shape) if n == 1]
    if singletons:
        return singletons[0]
    spacing = image.spacing
    return max(range(3), key=lambda a: (round(spacing[a], 3), -shape[a]))


def intensity_window(config: ModelConfig, array) -> tuple[float, float]:
    """The physical values that map to -1 and +1 for this model: its fixed window for CT (HU), else the
    image's own percentiles, as the training transforms (``NormalizeIntensityd``) chose them."""
    modality = (config.image.modality or "").upper()
    if modality in CT_MODALITIES:
        return config.image.intensity_range
    return NormalizeIntensityd("image").intensity_range(torch.as_tensor(array), modality)


def canonical(image: Image) -> tuple[Image, Callable[[np.ndarray], np.ndarray]]:
    """``image`` in its closest canonical (RAS) voxel order, as the training transforms (MONAI's
    ``Orientationd(as_closest_canonical=True)``) give a network its images, and the function that puts an array on
    that grid back in ``image``'s own voxel order. 2D images are returned as they are."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    if image.array.ndim != 3:
        return image, lambda array: array
    ornt = io_orientation(image.affine)
    affine = image.affine @ inv_ornt_aff(ornt, image.array.shape)
    back = ornt_transform(io_orientation(affine), ornt)
    reordered = Image(np.ascontiguousarray(apply_orientation(image.array, ornt)), affine, image.modality)
    return reordered, lambda array: np.ascontiguousarray(apply_orientation(array, back))
