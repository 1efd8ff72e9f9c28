"""What the task pipelines share about images: the axis a 2D model runs across, and model units."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from meddiff.data.transforms import CT_MODALITIES, NormalizeIntensityd
from meddiff.errors import MeddiffError
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


# Modalities whose images share units and appearance: a model of one family must not see another's images.
MODALITY_FAMILIES = {"CT": "CT", "MR": "MR", "CR": "X-ray", "DX": "X-ray", "DR": "X-ray", "RG": "X-ray",
                     "XR": "X-ray", "PT": "PET", "US": "ultrasound", "MG": "mammography"}


def check_modality(image: Image, config: ModelConfig, task: str) -> None:
    """Refuse an image whose modality contradicts the model's (CT in HU through an MR model, an MR slice through a
    CT model): its values would be read in the wrong units. Images or models naming none pass."""
    theirs = MODALITY_FAMILIES.get((image.modality or "").upper())
    ours = MODALITY_FAMILIES.get((config.image.modality or "").upper())
    if theirs and ours and theirs != ours:
        raise MeddiffError(f"the image is {image.modality} but this {task} model was trained on "
                           f"{config.image.modality} images — choose a {image.modality} model with --model "
                           "(a NIfTI's modality comes from --modality where the verb has it)")


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
