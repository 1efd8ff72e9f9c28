"""Editing (SDEdit, Meng et al., ICLR 2022): noise an image part-way, then denoise it under a new condition.

The image goes to model units (``volumes.intensity_window``) and the model's voxel size, is noised to the
timestep at ``strength`` of the sampler's schedule, and the last ``ceil(strength * steps)`` steps run from there
(diffusers' img2img ``get_timesteps``) with the model's conditioning: a class label, or a report with
classifier-free guidance and a negative prompt (``generate.model_function``). Low strength keeps the input's
anatomy and intensities; strength 1 starts from (nearly) pure noise and follows the condition alone. With a mask
the known region is replaced after every step by the input noised to the level the step leaves it at (RePaint's
hook, without jumps), and outside the mask the output is the input, bit for bit. Items and units as inpainting
has them (``volumes.remade``): a 2D model runs on the slices of a volume (those the mask touches), a 3D model on
the volume (or the region around the mask), on tiles of its training shape where the image is larger.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from pydantic import model_validator

from meddiff.diffusion.repaint import RESAMPLABLE, RePaint
from meddiff.diffusion.sampling import sample_loop
from meddiff.diffusion.tiling import pad_to, tiled_function
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.model import DiffusionModel, ModelConfig
from meddiff.pipelines.generate import check_conditioning, check_counts, initial_noise, model_function
from meddiff.pipelines.inpaint import mask_on_grid
from meddiff.pipelines.spec import SamplingSpec
from meddiff.pipelines.volumes import check_modality, model_grid, remade, resized


class EditSpec(SamplingSpec):
    """The sampling spec and how far back an edit starts: ``strength`` in (0, 1], the share of the sampler's
    ``steps`` that run (1: from the noisiest step)."""

    strength: float

    @model_validator(mode="after")
    def _strength_in_range(self) -> EditSpec:
        if not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise MeddiffError(f"--strength must be a number in (0, 1], not {self.strength} — low stays close to the "
                               "input, 1 follows the condition alone")
        return self


def edit_timesteps(sampler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
    """The timesteps an edit runs, of a sampler after ``set_timesteps(steps)``: its last ``ceil(strength * steps)``,
    cut as diffusers' img2img ``get_timesteps`` cuts them (which rounds down; here a strength below one step still
    runs one)."""
    run = min(steps, max(1, math.ceil(strength * steps - 1e-9)))  # 0.3 * 10 is 3.0000000000000004: 3 steps
    start = (steps - run) * getattr(sampler, "order", 1)
    if hasattr(sampler, "set_begin_index"):  # a multistep sampler counts its steps from here
        sampler.set_begin_index(start)
    return sampler.timesteps[start:]


def check_editable(config: ModelConfig) -> None:
    """One line for a model that cannot edit: what it is and what to use instead."""
    if config.autoencoder is not None:
        raise MeddiffError("this is a latent model: meddiff edit works on images in pixel space and does not encode "
                           "them to latents — use a pixel-space generating model (mri-t1-2d, or your own)")
    if config.unet.concat_channels:
        raise MeddiffError("this model takes a condition image with its input (a mask-conditioned inpainting model or "
                           "another image-conditioned one): edit with an unconditional, class- or report-conditioned "
                           "model — to fill a masked region use meddiff inpaint")
    if config.controlnet is not None:
        raise MeddiffError("this model follows a label map (ControlNet): edit takes a class label or a report, not a "
                           "label map — use meddiff generate --condition, or another model")


@torch.inference_mode()
def edit(model: DiffusionModel, image: Image, spec: EditSpec, mask: Image | np.ndarray | None = None, seed: int = 0,
         samples: int = 1, prompt: str | None = None, batch_size: int = 8, progress: bool = True) -> list[Image]:
    """``samples`` edits of ``image`` (2D or 3D), only inside ``mask`` when one is given; sample ``k`` of slice ``s``
    (of ``S`` slices a 2D model runs on; ``S = 1`` otherwise) uses seed ``seed + k * S + s``, whatever the batch."""
    config = model.config
    check_editable(config)  # what the model cannot do at all, before what it cannot do with this image
    check_modality(image, config, "editing")
    check_counts({"--samples": samples, "--seed": seed, "--batch-size": batch_size})
    if image.array.ndim not in (2, 3):
        raise MeddiffError(f"edit takes a 2D image or a 3D volume, not shape {image.array.shape} "
                           "— split a 4D series into volumes")
    image.check_finite()
    fill = np.ones(image.array.shape, bool) if mask is None else mask_on_grid(image, mask, verb="edit")
    prompts = None if prompt is None else [prompt]
    spec = check_conditioning(model, spec, [seed], prompts)
    if mask is not None and config.schedule.kind == "rflow":
        raise MeddiffError("a masked edit keeps the known region at each step's noise level as RePaint does, which "
                           "rectified-flow models do not support yet — edit without --mask")
    if mask is not None and spec.scheduler not in RESAMPLABLE:
        raise MeddiffError(f"a masked edit keeps the known region at each step's noise level, which only "
                           f"{' and '.join(RESAMPLABLE)} allow: use --scheduler {' or '.join(RESAMPLABLE)}, "
                           f"not {spec.scheduler}")
    sampler = model.schedule.scheduler(spec.scheduler)
    sampler.set_timesteps(spec.steps)
    steps = len(edit_timesteps(sampler, spec.steps, spec.strength))

    def make(known, keep, seeds, spacing, on_step):
        return _edit(model, spec, known, None if mask is None else keep, seeds, prompts, spacing, batch_size, on_step)

    return remade(model, image, fill, samples, seed, batch_size, make, steps, "edit", progress)


def _edit(model: DiffusionModel, spec: EditSpec, known: torch.Tensor, keep: torch.Tensor | None, seeds: list[int],
          prompts: list[str] | None, spacing, batch_size: int, on_step) -> torch.Tensor:
    """Edit a batch of items (N, *spatial) in model units; returns them on their own grid. ``keep``: where a masked
    edit keeps the input (None: no mask)."""
    config = model.config
    spatial = tuple(known.shape[1:])
    grid, padded = model_grid(spatial, spacing, config)
    x0 = pad_to(resized(known[:, None].float(), grid), padded).to(model.device)  # at the model's voxel size
    function = model_function(model, spec, 1, prompts)
    if any(p > t for p, t in zip(padded, config.image.shape, strict=True)):
        function = tiled_function(function, config.image.shape, config.unet.size_multiple, batch_size)
    sampler = model.schedule.scheduler(spec.scheduler)
    sampler.set_timesteps(spec.steps)
    timesteps = edit_timesteps(sampler, spec.steps, spec.strength)
    noise, generators = initial_noise(model, seeds, padded)
    x = sampler.add_noise(x0, noise, timesteps[:1])  # the input at the noise level of the first step run

    def progress(position: int, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        on_step(1)
        return x

    hooks = [progress]
    if keep is not None:  # RePaint without jumps, its steps counted from the first one run
        hold = pad_to(resized(keep[:, None].float(), grid, area=True), padded)
        repaint = RePaint(x0, (hold >= 1.0).to(model.device), sampler, jump=1, resample=1, generator=generators)
        skipped = len(sampler.timesteps) - len(timesteps)
        hooks.insert(0, lambda position, t, x: repaint(skipped + position, t, x))
    x = sample_loop(function, x, sampler, timesteps, generators, hooks, from_noise=False)
    x = resized(x[(slice(None), slice(None), *[slice(0, n) for n in grid])].float().cpu(), spatial)
    return x.mean(dim=1)  # a model of several channels (RGB) gives their mean, as generate.to_image does
