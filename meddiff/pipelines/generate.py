"""Generation: pure noise to images, with the conditioning a model takes.

Item ``i`` of a call depends only on its seed (one generator per item), its prompt and the spec, so a
set made in batches of any size, resumed or sharded over devices, is the same set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from meddiff.data.transforms import CT_MODALITIES, from_model_range
from meddiff.diffusion import latent
from meddiff.diffusion.guidance import classifier_free_guidance, doubled
from meddiff.diffusion.sampling import ModelFunction, sample_loop, unet_function
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io.guard import physical_memory
from meddiff.model import DiffusionModel
from meddiff.pipelines.spec import SamplingSpec

CT_RANGE = (-1024.0, 3071.0)  # HU a CT scanner stores (12 bits): air to dense bone and metal
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (negative values wrap around: refused)


def check_counts(counts: dict[str, int]) -> None:
    """Each of ``{name: value}`` is a whole number, at least 1 (0 for a seed): the image count, batch size and seed."""
    for name, value in counts.items():
        least = 0 if name.lstrip("-") == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise MeddiffError(f"{name} must be a whole number >= {least}, not {value!r}")


def check_sample_args(model: DiffusionModel, spec: SamplingSpec, seeds: Sequence[int],
                      prompts: Sequence[str] | None = None,
                      shape: Sequence[int] | None = None, batch_size: int | None = None,
                      condition: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                      items: int | None = None) -> SamplingSpec:
    """The spec checked for this model (``SamplingSpec.checked``), or one clear line for any argument
    ``sample`` cannot use, before any work is done. ``generate`` and ``meddiff generate`` call it once for
    the whole run (``batch_size``: the largest batch; ``items``: how many are sampled in all, when ``seeds`` holds
    only the first and last of the run's seeds), so nothing bad is found half-way."""
    spec = check_conditioning(model, spec, seeds, prompts)
    extra = model.config.unet.concat_channels
    if extra and condition is None:
        raise MeddiffError(f"this model takes a condition image of {extra} channel(s) concatenated to its input: "
                           "give it (sample(..., condition=...)) or use the task pipeline made for it")
    if not extra and condition is not None:
        raise MeddiffError("this model takes no condition image — leave it out")
    model.check_labels(labels, shape or model.config.image.shape, len(seeds))
    items = items or len(seeds)
    batch = min(batch_size or items, items) * (2 if spec.guided else 1)
    check_shape(model, shape, batch)
    if condition is not None:
        expected = (len(seeds), extra, *(shape or model.config.image.shape))
        if tuple(condition.shape) != expected:
            raise MeddiffError(f"the condition has shape {tuple(condition.shape)}; "
                               f"this model and sample need {expected}")
    return spec


def check_conditioning(model: DiffusionModel, spec: SamplingSpec, seeds: Sequence[int],
                       prompts: Sequence[str] | None = None) -> SamplingSpec:
    """The spec, the seeds and the prompts checked for this model (what every sampling task needs)."""
    spec = spec.checked(model.config)
    if len(seeds) == 0:
        raise MeddiffError("no seeds given: nothing to sample")
    values = (seeds[0], seeds[-1]) if isinstance(seeds, range) else seeds
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED for s in values):
        raise MeddiffError(f"seeds must be whole numbers from 0 to {MAX_SEED} (image i uses seed + i) "
                           "— choose a smaller --seed")
    if model.config.text_encoder is not None:
        if prompts is None or len(prompts) != len(seeds):
            raise MeddiffError(f"this model is report-conditioned: give one prompt per image ({len(seeds)}), "
                               "e.g. meddiff generate --prompt TEXT")
        model.text_encoder  # noqa: B018 - loads the encoder now, so a broken one fails before any work
    elif prompts is not None:
        raise MeddiffError("this model has no text encoder: it takes no prompts "
                           "— leave them out, or use a report-conditioned model")
    return spec


def check_shape(model: DiffusionModel, shape: Sequence[int] | None, batch: int) -> None:
    """The sample shape fits the UNet (one size per spatial axis, divisible by its down-sampling) and memory."""
    unet, autoencoder = model.config.unet, model.config.autoencoder
    shape = list(shape or model.config.image.shape)
    multiple = unet.size_multiple * (autoencoder.downsample if autoencoder else 1)
    if len(shape) != unet.spatial_dims or any(
        isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 or s % multiple for s in shape
    ):
        raise MeddiffError(f"sample shape {shape} does not fit this {unet.spatial_dims}D model: "
                           f"give {unet.spatial_dims} sizes, each a positive multiple of {multiple}")
    # the first level's feature maps alone (float32) must fit in this machine's memory; the real need is larger
    first = autoencoder.channels[0] if autoencoder else unet.channels[0]  # a decoder's last level: image size
    need = batch * math.prod(int(s) for s in shape) * int(first) * 4
    memory = physical_memory()
    if memory is not None and need > memory:
        raise MeddiffError(f"a batch of {batch} images of shape {shape} needs more than {need / 2**30:.0f} GiB; "
                           f"this machine has {memory / 2**30:.0f} GiB "
                           "— use a smaller --batch-size or a smaller image shape")


def model_function(model: DiffusionModel, spec: SamplingSpec, items: int, prompts: Sequence[str] | None = None,
                   condition: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> ModelFunction:
    """The model's network with this sample's conditioning bound and, for ``spec.guided``, classifier-free guidance.

    ``prompts``: one per item, or one for all items; ``guidance_scale`` 0 is the unconditional model alone.
    ``labels``: a label-map model's maps, one per item or one for all (bound into the network by the model).
    """
    device = model.device
    classes = None if spec.class_label is None else torch.full((items,), spec.class_label, device=device)
    scalars = None if not spec.condition_values else torch.tensor([list(spec.condition_values.values())])
    if model.config.text_encoder is None:
        return unet_function(model.conditioned_unet(items, labels, scalars=scalars), classes, None, condition)
    if spec.guidance_scale == 0.0:  # uncond + 0 * (cond - uncond): the unconditional half alone
        prompts = [spec.negative_prompt] * len(prompts)
    context = model.text_encoder.context(list(prompts)).to(device)
    if not spec.guided:
        return unet_function(model.conditioned_unet(items, labels, scalars=scalars), classes, context, condition)
    negative = model.text_encoder.context([spec.negative_prompt] * len(prompts)).to(device)
    both = unet_function(model.conditioned_unet(items, labels, guided=True, scalars=scalars), doubled(classes),
                         torch.cat([negative, context]), doubled(condition))
    return classifier_free_guidance(both, spec.guidance_scale)


def initial_noise(model: DiffusionModel, seeds: Sequence[int],
                  shape: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T of each item from its own seed, and the items' generators (the sampler's later noise)."""
    generators = [torch.Generator(model.device).manual_seed(int(s)) for s in seeds]
    x = randn_tensor((len(seeds), model.config.unet.out_channels, *shape), generator=generators, device=model.device)
    return x, generators


@torch.inference_mode()
def sample(model: DiffusionModel, spec: SamplingSpec, seeds: Sequence[int], prompts: Sequence[str] | None = None,
           shape: Sequence[int] | None = None, condition: torch.Tensor | None = None,
           labels: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise from pure noise: (len(seeds), C, *shape) in model units; a latent model samples latents and
    decodes them. ``condition``: the concatenated input channels of a concat-conditioned model, in model units;
    ``labels``: a label-map model's integer maps (1 or len(seeds), 1, *shape) on the sample's grid."""
    spec = check_sample_args(model, spec, seeds, prompts, shape, condition=condition, labels=labels)
    sampler = model.schedule.scheduler(spec.scheduler)
    sampler.set_timesteps(spec.steps)  # timesteps stay on the CPU: indexing schedule tables never syncs a GPU
    x, generators = initial_noise(model, seeds, model.config.sample_shape(shape))
    condition = None if condition is None else condition.to(model.device)
    x = sample_loop(model_function(model, spec, len(seeds), prompts, condition, labels), x, sampler,
                    generator=generators)
    autoencoder = model.config.autoencoder
    if autoencoder is None:
        return x
    return latent.decode(model.autoencoder, x, autoencoder.scale_factor, autoencoder.decode_tile)


def physical(model: DiffusionModel, x: np.ndarray) -> np.ndarray:
    """Generated values in model units -> physical units: where every generated image leaves model units. A CT is
    clipped to what a scanner stores, -1024 to 3071 HU (``CT_RANGE``): the network's output is not bounded, and
    values below air or above dense bone are no tissue (a model that saw the -2048 padding outside a scanner's
    field of view learnt to write it) and would skew any HU statistic of a synthetic set."""
    info = model.config.image
    array = from_model_range(x, *info.intensity_range)
    if (info.modality or "").upper() in CT_MODALITIES:
        array = np.clip(array, *CT_RANGE)
    return array


def to_image(model: DiffusionModel, x: torch.Tensor) -> Image:
    """One sample (C, *spatial) in model units -> an ``Image`` in physical units and training spacing. A model that
    makes several channels (an imported Stable-Diffusion-family model's RGB) gives their mean: a grayscale image."""
    info = model.config.image
    array = physical(model, x.float().mean(dim=0).cpu().numpy())
    spacing = list(info.spacing or [1.0] * array.ndim)
    return Image(array=array, affine=np.diag([*spacing[: array.ndim], *[1.0] * (4 - array.ndim)]),
                 modality=info.modality)


def generate(model: DiffusionModel, spec: SamplingSpec, n: int = 1, seed: int = 0, batch_size: int = 8,
             prompts: Sequence[str] | None = None, progress: bool = True) -> list[Image]:
    """``n`` images; image ``i`` uses seed ``seed + i`` (and ``prompts[i]``), whatever the batch size."""
    check_counts({"n": n, "batch_size": batch_size, "seed": seed})
    if prompts is not None and len(prompts) != n:
        raise MeddiffError(f"{len(prompts)} prompts given for {n} images")
    spec = check_sample_args(model, spec, range(seed, seed + n), prompts, None, batch_size)
    images = []
    for start in tqdm(range(0, n, batch_size), disable=not progress, desc="generate", unit="batch"):
        stop = min(n, start + batch_size)
        x = sample(model, spec, range(seed + start, seed + stop),
                   None if prompts is None else list(prompts[start:stop]))
        images.extend(to_image(model, item) for item in x)
    return images
