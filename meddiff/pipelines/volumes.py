"""What the task pipelines share about images: the axis a 2D model runs across, model units, the model's voxel
grid, and remaking a region of an image item by item (``remade``: inpaint and edit)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff.data.transforms import CT_MODALITIES, NormalizeIntensityd, from_model_range, to_model_range
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.model import DiffusionModel, ModelConfig
from meddiff.pipelines.generate import CT_RANGE

SPACING_TOLERANCE = 0.05  # a voxel size within 5 % of the model's is used as it is


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


def model_grid(spatial: Sequence[int], spacing: Sequence[float],
               config: ModelConfig) -> tuple[tuple[int, ...], list[int]]:
    """The grid of an item of ``spatial`` voxels of ``spacing`` mm at the model's voxel size (what it learnt anatomy
    at; a side within ``SPACING_TOLERANCE`` of the model's keeps its size), and that grid padded to what the UNet
    divides."""
    factors = [1.0] * len(spatial)
    if config.image.spacing:
        factors = [s / m for s, m in zip(spacing, config.image.spacing, strict=True)]
        factors = [1.0 if abs(f - 1.0) <= SPACING_TOLERANCE else f for f in factors]
    resized = tuple(max(1, round(n * f)) for n, f in zip(spatial, factors, strict=True))
    multiple = config.unet.size_multiple
    return resized, [-(-n // multiple) * multiple for n in resized]


def resized(x: torch.Tensor, size: Sequence[int], area: bool = False) -> torch.Tensor:
    """(N, C, *spatial) at ``size``: (bi/tri)linear for images, ``area`` for masks (the share of each voxel)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    if area:
        return torch.nn.functional.interpolate(x, size=tuple(size), mode="area")
    mode = "bilinear" if len(size) == 2 else "trilinear"
    return torch.nn.functional.interpolate(x, size=tuple(size), mode=mode, align_corners=False)


def context_box(fill: np.ndarray, spacing, config: ModelConfig) -> tuple[slice, ...]:
    """The mask's bounding box widened on every side by half the model's training extent (in mm, as voxels of
    the image), clipped to the volume: a tile centred on the region sees as much context as in training."""
    model_spacing = config.image.spacing or spacing
    box = []
    for axis in range(fill.ndim):
        indices = np.flatnonzero(fill.any(axis=tuple(a for a in range(fill.ndim) if a != axis)))
        low, high = int(indices[0]), int(indices[-1])
        margin = int(np.ceil(config.image.shape[axis] * model_spacing[axis] / spacing[axis] / 2))
        box.append(slice(max(0, low - margin), min(fill.shape[axis], high + 1 + margin)))
    return tuple(box)


def remade(model: DiffusionModel, image: Image, fill: np.ndarray, samples: int, seed: int, batch_size: int,
           make: Callable[..., torch.Tensor], steps: int, verb: str, progress: bool) -> list[Image]:
    """``samples`` copies of ``image`` (2D or 3D) whose region ``fill`` is remade by the model and whose rest is the
    input, bit for bit in its own units and geometry.

    A 2D model runs on the slices across ``slice_axis`` that ``fill`` touches, a 3D model on the region around it
    (``context_box``; the whole volume when ``fill`` is). ``make(known, keep, seeds, spacing, on_step)`` takes a
    batch of at most ``batch_size`` items in model units (N, *spatial), where each is kept, a seed each (sample
    ``k`` of item ``s`` of ``S``: ``seed + k * S + s``, whatever the batch) and the items' voxel size, calls
    ``on_step(1)`` after each of its ``steps`` steps and returns them remade in model units. Back in physical units
    a CT is clipped to what a scanner stores and a scan stored as whole numbers gets whole numbers (so DICOM stores
    it exactly again).
    """
    config = model.config
    dims = config.unet.spatial_dims
    if dims == 3 and (image.array.ndim != 3 or 1 in image.array.shape):
        raise MeddiffError(f"this 3D model {verb}s volumes; the image has shape {image.array.shape} — use a 2D model")
    axis = slice_axis(image) if image.array.ndim == 3 else None
    low, high = intensity_window(config, image.array)
    whole_numbers = np.array_equal(image.array, np.round(image.array))
    ct = (image.modality or config.image.modality or "").upper() in CT_MODALITIES
    # a 3D model works on the region around the mask; the rest of the volume is the input as it is
    box = context_box(fill, image.spacing, config) if dims == 3 else (slice(None),) * fill.ndim
    # a stack of items along a leading axis: the slices across ``axis`` for a 2D model, else the one image
    stacked = dims == 2 and axis is not None
    source = np.moveaxis(image.array, axis, 0) if stacked else image.array[box][None]
    fills = np.moveaxis(fill, axis, 0) if stacked else fill[box][None]
    spacing = [s for a, s in enumerate(image.spacing) if a != axis] if stacked else image.spacing
    touched = np.flatnonzero(fills.reshape(len(fills), -1).any(axis=1))
    chunks = [touched[start:start + batch_size] for start in range(0, len(touched), batch_size)]
    results = []
    with tqdm(total=steps * len(chunks) * samples, desc=verb, unit="step", delay=2.0, disable=not progress) as bar:
        for k in range(samples):
            result = source.copy()
            for chunk in chunks:
                known = to_model_range(torch.from_numpy(source[chunk]), low, high)
                seeds = [seed + k * len(source) + int(s) for s in chunk]
                made = make(known, torch.from_numpy(~fills[chunk]), seeds, spacing, bar.update)
                physical = from_model_range(made.numpy(), low, high)
                if ct:  # tissue a scanner can store, never below air (as generate.physical)
                    physical = np.clip(physical, *CT_RANGE)
                if whole_numbers:  # a scan stored as integers (DICOM) gets integers, so it is stored exactly again
                    physical = np.round(physical)
                result[chunk] = np.where(fills[chunk], physical, source[chunk])  # outside the region: the input itself
            array = image.array.copy()
            array[box] = np.moveaxis(result, 0, axis) if stacked else result[0]
            results.append(Image(array, image.affine.copy(), image.modality, dict(image.meta)))
    return results
