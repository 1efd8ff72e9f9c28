"""What the task pipelines share about images: the axis a 2D model runs across, and model units."""

from __future__ import annotations

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
