"""Generation from a label map: a ControlNet model makes images whose anatomy follows the map.

The map is put in the closest canonical (RAS) voxel order, as the training transforms give a network its images,
taken to the model's voxel size (nearest neighbour: labels stay labels), padded with background to what the
networks divide, sampled, and the images are brought back to the map's own grid and voxel order, so each result
has the map's shape and affine. A 2D model runs across the map's slice axis, slice by slice (no consistency
between slices); image ``k`` (base seed ``seed + k``) draws slice ``s`` of ``S`` with seed ``(seed + k) * S + s``,
whatever the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.model import DiffusionModel
from meddiff.pipelines.generate import check_counts, check_sample_args, physical, sample
from meddiff.pipelines.spec import SamplingSpec
from meddiff.pipelines.volumes import canonical, slice_axis


def check_label_map(model: DiffusionModel, labels: Image) -> None:
    """One clear line unless the model has a ControlNet and the map holds whole numbers from 0 to what the model
    encodes, with the dimensions the model runs on."""
    controlnet = model.config.controlnet
    if controlnet is None:
        raise MeddiffError("this model takes no label map — leave out --condition, or use a model with a ControlNet")
    array, dims = labels.array, model.config.unet.spatial_dims
    if array.ndim not in (2, 3) or (dims == 3 and (array.ndim != 3 or 1 in array.shape)):
        need = "a 2D or 3D map" if dims == 2 else "a 3D map"
        raise MeddiffError(f"the label map has shape {array.shape}; this {dims}D model needs {need}")
    if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
        raise MeddiffError("the label map holds values that are not whole numbers — give an integer label map")
    largest = 2 ** controlnet.label_channels - 1
    if array.min() < 0 or array.max() > largest:
        raise MeddiffError(f"the label map holds labels {int(array.min())} to {int(array.max())}; this model knows "
                           f"0 to {largest} ({len(controlnet.structures)} named structures)")


@dataclass(frozen=True)
class LabelPlan:
    """A label map made ready for the model: ``maps`` (S, 1, *padded) at the model's voxel size, one per slice
    (S = 1 unless a 2D model runs across a 3D map's ``axis``), and the grids to crop and resize back to."""

    maps: torch.Tensor
    axis: int | None
    grid: tuple[int, ...]
    resized: list[int]
    padded: list[int]
    back: Callable[[np.ndarray], np.ndarray]  # a result on the canonical grid -> the map's own voxel order


def plan(model: DiffusionModel, labels: Image) -> LabelPlan:
    check_label_map(model, labels)
    labels, back = canonical(labels)  # the voxel order the model was trained in
    array = labels.array.astype(np.int64)
    config = model.config
    axis = slice_axis(labels) if config.unet.spatial_dims == 2 and array.ndim == 3 else None
    items = np.moveaxis(array, axis, 0) if axis is not None else array[None]
    spacing = [s for a, s in enumerate(labels.spacing) if a != axis] if axis is not None else list(labels.spacing)
    grid = items.shape[1:]
    model_spacing = config.image.spacing or spacing
    resized = [max(1, round(side * s / m)) for side, s, m in zip(grid, spacing, model_spacing, strict=True)]
    multiple = config.unet.size_multiple * (config.autoencoder.downsample if config.autoencoder else 1)
    padded = [-(-side // multiple) * multiple for side in resized]
    maps = F.interpolate(torch.from_numpy(items)[:, None].float(), size=resized, mode="nearest-exact")
    maps = F.pad(maps, [p for r, full in zip(reversed(resized), reversed(padded), strict=True) for p in (0, full - r)])
    return LabelPlan(maps, axis, grid, resized, padded, back)


def check_label_args(model: DiffusionModel, labels: Image, spec: SamplingSpec, seeds: Sequence[int],
                     batch_size: int) -> tuple[SamplingSpec, LabelPlan]:
    """The spec checked for sampling on this map (and the map's plan), before any work is done."""
    ready = plan(model, labels)
    slices = len(ready.maps)
    return check_sample_args(model, spec, [seeds[0] * slices, seeds[-1] * slices + slices - 1], None, ready.padded,
                             batch_size, labels=ready.maps[:1], items=len(seeds) * slices), ready


@torch.inference_mode()
def generate_from_labels(model: DiffusionModel, labels: Image, spec: SamplingSpec, n: int = 1, seed: int = 0,
                         batch_size: int = 8, progress: bool = True) -> list[Image]:
    """``n`` images on ``labels``' grid whose structures follow it, in physical units; image ``k`` has the base
    seed ``seed + k`` (its slice ``s`` of ``S``: seed ``(seed + k) * S + s``)."""
    check_counts({"n": n, "batch_size": batch_size, "seed": seed})
    spec, ready = check_label_args(model, labels, spec, range(seed, seed + n), batch_size)
    slices = len(ready.maps)
    made = np.empty((n, slices, *ready.grid), np.float32)
    jobs = [(k, s) for k in range(n) for s in range(slices)]
    for start in tqdm(range(0, len(jobs), batch_size), disable=not progress, desc="generate", unit="batch"):
        chunk = jobs[start:start + batch_size]
        seeds = [(seed + k) * slices + s for k, s in chunk]
        x = sample(model, spec, seeds, None, ready.padded, labels=ready.maps[[s for _, s in chunk]])
        x = x[(slice(None), slice(None), *[slice(0, r) for r in ready.resized])].float().cpu()
        if list(ready.resized) != list(ready.grid):
            mode = "bilinear" if len(ready.grid) == 2 else "trilinear"
            x = F.interpolate(x, size=ready.grid, mode=mode, align_corners=False)
        for (k, s), image in zip(chunk, x[:, 0].numpy(), strict=True):
            made[k, s] = physical(model, image)
    axis = ready.axis
    return [Image(ready.back(np.moveaxis(volume, 0, axis) if axis is not None else volume[0]), labels.affine.copy(),
                  model.config.image.modality) for volume in made]
