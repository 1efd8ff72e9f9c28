"""Inpainting: a mask-conditioned model's own pass, or RePaint (``diffusion.repaint``) with any unconditional or
report-conditioned model.

The image goes to model units (``volumes.intensity_window``) and, where the model learnt another voxel size,
to the model's spacing; the known region is kept at every step, the masked region is filled, and the result
is written back only inside the mask: outside it the output is the input, bit for bit, in its own units
and geometry. A 2D model runs on the slices the mask touches (across ``volumes.slice_axis``); a 3D model on
the region around the mask (its bounding box widened by half the model's training extent on every side: a
tile centred on the region sees as much context as in training; a small region of a large volume costs a few
tiles, not the volume); an image larger than the model's training shape is sampled on tiles at every step.
A model with ``inpaint_prefill`` fills the region classically on the input's own grid first, sees that fill as
its condition and samples only the residual, which is added back to the fill.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from meddiff.data.masks import inpaint_condition, prefilled
from meddiff.diffusion.repaint import RESAMPLABLE, RePaint
from meddiff.diffusion.sampling import concatenated, sample_loop
from meddiff.diffusion.tiling import pad_to, tiled_function
from meddiff.errors import MeddiffError
from meddiff.image import Image, grid_words
from meddiff.model import DiffusionModel
from meddiff.pipelines.generate import check_conditioning, check_counts, initial_noise, model_function
from meddiff.pipelines.spec import SamplingSpec
from meddiff.pipelines.volumes import model_grid, remade, resized

DEFAULT_MODELS = {"MR": "mri-inpaint", "CT": "ct-inpaint"}  # the bundled model of each modality


class InpaintSpec(SamplingSpec):
    """RePaint's plan on top of the sampling spec: ``resample`` passes over each stretch of ``jump`` steps
    (a mask-conditioned model, ``task`` "inpaint", fills in one plain pass and ignores them)."""

    scheduler: str = "ddpm"
    resample: int = 5
    jump: int = 10

    def checked(self, config) -> InpaintSpec:
        spec = super().checked(config)
        if config.task == "inpaint":
            return spec
        if self.scheduler not in RESAMPLABLE:
            raise MeddiffError(f"RePaint steps back in time, which multistep samplers cannot: use --scheduler "
                               f"{' or '.join(RESAMPLABLE)}, not {self.scheduler}")
        if self.resample < 1 or self.jump < 1:
            raise MeddiffError(f"--resample and --jump must be at least 1, not {self.resample} and {self.jump}")
        return spec


def default_model(modality: str | None) -> str:
    """The bundled inpainting model for ``modality`` (MR: ``mri-inpaint``, CT: ``ct-inpaint``)."""
    if modality is None:
        raise MeddiffError("the image file names no modality (NIfTI carries none): pass --modality MR or CT, "
                           "or --model NAME|DIR")
    if modality.upper() not in DEFAULT_MODELS:
        raise MeddiffError(f"no bundled inpainting model for modality {modality}: pass --model NAME|DIR "
                           f"(bundled: {', '.join(DEFAULT_MODELS.values())})")
    return DEFAULT_MODELS[modality.upper()]


def mask_on_grid(image: Image, mask: Image | np.ndarray, verb: str = "inpaint") -> np.ndarray:
    """The mask as booleans of the image's spatial shape (true: fill, denoise or edit), or one clear line why it
    cannot be.

    A mask ``Image`` on another voxel grid is resampled onto the image's by their geometry (nearest voxel);
    a plain array must have the image's shape. A mask holds one value for "keep" (0) and one for "fill"
    (1, 255, ...): a label map or a probability map is refused, as is a mask that selects nothing, one that does
    not overlap the image, and for inpainting one that selects everything.
    """
    acted = {"inpaint": "filled", "denoise": "denoised", "edit": "edited"}[verb]
    spatial = image.array.shape
    if len(spatial) == 4:
        raise MeddiffError(f"{verb} takes a 2D image or a 3D volume, not a 4D series {spatial} "
                           "— split it into volumes")
    if isinstance(mask, Image):
        values, affine = mask.array, mask.affine
    else:
        values, affine = np.asarray(mask), None
    if values.dtype == bool:
        values = values.astype(np.uint8)
    levels = np.unique(values)
    if (
        not np.issubdtype(values.dtype, np.number)
        or len(levels) > 2
        or levels.min() < 0
        or (len(levels) == 2 and levels[0] != 0)
    ):
        shown = ", ".join(f"{v:g}" for v in levels[:4]) + (", ..." if len(levels) > 4 else "")
        raise MeddiffError(f"the mask is not binary (values {shown}): "
                           f"give 0 where the image is kept and 1 (or 255) where it is {acted} "
                           "— threshold a probability map or pick one label of a label map first")
    fill = values > 0
    same_grid = affine is None or np.allclose(affine, image.affine, atol=1e-3)
    if fill.shape != spatial and same_grid:
        mask_grid = grid_words(fill.shape, affine) if affine is not None else f"shape {fill.shape}"
        raise MeddiffError(f"the mask's grid ({mask_grid}) is not the image's ({image.grid}) — give a mask of the "
                           "image's shape (or a NIfTI/DICOM mask whose geometry places it on the image)")
    if not same_grid and fill.any():
        fill = _resample_nearest(fill, affine, spatial, image.affine)
        if not fill.any():
            raise MeddiffError(f"the mask ({grid_words(values.shape, affine)}) does not overlap the image "
                               f"({image.grid}): their geometries place it elsewhere — give a mask drawn on this image")
    if not fill.any():
        raise MeddiffError(f"the mask is empty: it marks nothing to {verb} (give 1 where the image is to be {acted})")
    if fill.all() and verb == "inpaint":
        raise MeddiffError("the mask covers the whole image: nothing is left to keep "
                           "— to make new images use meddiff generate")
    return fill


def _resample_nearest(fill: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                      image_affine: np.ndarray) -> np.ndarray:
    """``fill`` (voxel -> mm by ``affine``) onto the grid of ``shape`` and ``image_affine``, nearest voxel."""
    source = fill.reshape(fill.shape + (1,) * (3 - fill.ndim)).astype(np.uint8)
    voxels = np.linalg.inv(affine) @ image_affine  # image voxel -> mask voxel
    target = tuple(shape) + (1,) * (3 - len(shape))
    out = ndimage.affine_transform(source, voxels[:3, :3], offset=voxels[:3, 3], output_shape=target, order=0, cval=0)
    return out.reshape(shape).astype(bool)


@torch.inference_mode()
def inpaint(model: DiffusionModel, image: Image, mask: Image | np.ndarray, spec: InpaintSpec | None = None,
            seed: int = 0, samples: int = 1, prompt: str | None = None, batch_size: int = 8,
            progress: bool = True) -> list[Image]:
    """``samples`` fills of the masked region of ``image`` (2D or 3D); sample ``k`` of slice ``s`` (of ``S``
    slices a 2D model runs on; ``S = 1`` otherwise) uses seed ``seed + k * S + s``, whatever the batch."""
    if model.config.autoencoder is not None:
        raise MeddiffError("this is a latent model: it generates images but cannot inpaint them — use a "
                           "mask-conditioned model (mri-inpaint, ct-inpaint) or a pixel-space one")
    spec = spec or InpaintSpec()
    check_counts({"--samples": samples, "--seed": seed, "--batch-size": batch_size})
    image.check_finite()
    fill = mask_on_grid(image, mask)
    config = model.config
    if config.unet.concat_channels and config.task != "inpaint":
        raise MeddiffError("this model takes a condition image concatenated to its input that is not a mask: "
                           "inpaint with a mask-conditioned (task inpaint), unconditional or report-conditioned model")
    prompts = None if prompt is None else [prompt]
    spec = check_conditioning(model, spec, [seed], prompts)
    steps = spec.steps if config.task == "inpaint" else len(RePaint.plan_for(spec.steps, spec.jump, spec.resample))

    def make(known, keep, seeds, spacing, on_step):
        return _fill(model, spec, known, keep, seeds, prompts, spacing, batch_size, on_step)

    return remade(model, image, fill, samples, seed, batch_size, make, steps, "inpaint", progress)


def _fill(model: DiffusionModel, spec: InpaintSpec, known: torch.Tensor, keep: torch.Tensor, seeds: list[int],
          prompts: list[str] | None, spacing, batch_size: int, on_step) -> torch.Tensor:
    """Fill a batch of items (N, *spatial) in model units; returns them filled, on their own grid. A
    mask-conditioned model sees [masked image, mask] at every step; any other model runs RePaint. With
    ``inpaint_prefill`` the condition is [prefill, mask], the prefill made here at full resolution (the same
    ``prefilled`` training used) and resized to the model's grid, and the result is prefill + the sampled residual
    (resized back): a network that predicts no residual returns the classical fill."""
    config = model.config
    spatial = tuple(known.shape[1:])
    resized_grid, padded = model_grid(spatial, spacing, config)
    fill_in = prefilled(known.float(), ~keep) if config.inpaint_prefill else None  # on the input's own grid
    x0 = resized((known if fill_in is None else fill_in)[:, None].float(), resized_grid)  # to the model's voxel size
    hold = resized(keep[:, None].float(), resized_grid, area=True)
    multiple = config.unet.size_multiple
    x0, hold = pad_to(x0, padded), pad_to(hold, padded)
    device = model.device
    x0, kept = x0.to(device), (hold >= 1.0).to(device)  # a voxel partly to fill is filled
    function = model_function(model, spec, 1, prompts)  # a mask-conditioned model gets its condition below
    condition, region = None, (~kept).to(x0.dtype)
    if config.task == "inpaint":  # the input with its region set to 0, or the prefill (already filled) as it is
        condition = inpaint_condition(x0, region, channel_dim=1) if fill_in is None else torch.cat([x0, region], 1)
    if any(p > t for p, t in zip(padded, config.image.shape, strict=True)):
        function = tiled_function(function, config.image.shape, multiple, batch_size)
    if condition is not None:  # outside the tiles, so each tile carries its part of the condition
        function = concatenated(function, condition)
    sampler = model.schedule.scheduler(spec.scheduler)
    if condition is not None:  # the first step at the last timestep, pure noise: few steps start where training
        sampler.register_to_config(timestep_spacing="trailing")  # did (Lin et al. 2024); 1 step: the x0 estimate
    sampler.set_timesteps(spec.steps)
    noise, generators = initial_noise(model, seeds, padded)

    def progress(position: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        on_step(1)
        return x

    if condition is not None:
        x = sample_loop(function, noise, sampler, generator=generators, hooks=[progress])
    else:
        repaint = RePaint(x0, kept, sampler, spec.jump, spec.resample, generators)
        x = sample_loop(function, noise, sampler, repaint.timesteps, generators,
                        [repaint, progress])
    x = resized(x[(slice(None), slice(None), *[slice(0, n) for n in resized_grid])].float().cpu(), spatial)
    return x[:, 0] if fill_in is None else fill_in + x[:, 0]
