"""``DiffusionPipeline``: a trained denoiser plus its noise schedule, saved as JSON + safetensors.

The sampling loop is the short, unrolled one diffusers uses: scale the input, predict, step.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from monai.inferers import sliding_window_inference
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meddiff import __version__
from meddiff.data.transforms import NormalizeIntensityd, from_model_range
from meddiff.diffusion.denoise import denoise_tensor
from meddiff.diffusion.noise_level import estimate_noise_sigma
from meddiff.diffusion.rician import correct_rician_bias
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError, first_line
from meddiff.files import atomic_path, file_sha256
from meddiff.image import Image
from meddiff.io.guard import physical_memory
from meddiff.nets import build_unet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1 (negative values wrap around: refused)
# tiles of denoising overlap by a quarter of a side (as MONAI's sliding-window default)
DENOISE_OVERLAP = 0.25
# a slice side below this has too few voxels for a noise estimate or a UNet's levels
MIN_DENOISE_SIDE = 8


class DiffusionPipeline:
    """Generate images with a diffusion model.

    ``config`` holds three JSON-friendly parts: ``unet`` (``build_unet`` arguments), ``schedule``
    (``NoiseSchedule`` fields) and ``image`` (``shape``, ``spacing`` in mm, ``modality``, and the
    ``intensity_range`` that [-1, 1] maps back to: HU for CT, normalised units for MR), plus
    ``max_train_timestep`` for a denoising prior trained on low noise levels only.
    """

    def __init__(self, unet: torch.nn.Module, config: dict, text_encoder=None):
        self.unet = unet
        self.config = config
        self.schedule = NoiseSchedule(**config["schedule"])
        self._text_encoder = text_encoder

    @property
    def text_encoder(self):
        """The report encoder of a report-conditioned model (loaded from its spec on first use)."""
        if "text_encoder" not in self.config:
            raise MeddiffError("this model is not report-conditioned: it takes no prompts")
        if self._text_encoder is None:
            from meddiff.encoders import load_text_encoder

            spec = self.config["text_encoder"]
            self._text_encoder = load_text_encoder(spec["spec"], max_length=spec.get("max_length"))
        return self._text_encoder

    @classmethod
    def from_config(cls, config: dict) -> DiffusionPipeline:
        return cls(build_unet(**config["unet"]), config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionPipeline:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            raise MeddiffError(f"{directory} is not a meddiff model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        from meddiff.weights import check_fit

        try:
            config = json.loads(config_path.read_text())
            pipeline = cls.from_config(config)
        except (ValueError, KeyError, TypeError, RuntimeError) as exc:  # JSONDecodeError is a ValueError
            raise MeddiffError(f"cannot load the model in {directory}: {CONFIG_NAME} is not a meddiff model config ({first_line(exc)}) — "
                               f"use a folder written by meddiff export") from None
        try:  # safetensors: tensors only, nothing in the file is ever run
            state = load_file(weights_path, device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise MeddiffError(f"cannot load the model in {directory}: {WEIGHTS_NAME} is not a readable safetensors file ({first_line(exc)}) — "
                               f"use a folder written by meddiff export") from None
        check_fit(pipeline.unet, state, f"the model in {directory}: {WEIGHTS_NAME} does not fit {CONFIG_NAME}",
                  "use the config.json and model.safetensors exported together (meddiff export)")
        pipeline.unet.load_state_dict(state)
        pipeline.unet.to(device).eval()
        pipeline.config["weights_sha256"] = file_sha256(weights_path)
        return pipeline

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into a new (or, with overwrite, reused) folder."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise MeddiffError(f"{directory} is not empty — choose another folder or pass --overwrite")
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        with atomic_path(directory / WEIGHTS_NAME, overwrite=True) as tmp:
            save_file(state, tmp, metadata={"format": "pt", "meddiff": __version__})
        config = {k: v for k, v in self.config.items() if k != "weights_sha256"}
        with atomic_path(directory / CONFIG_NAME, overwrite=True) as tmp:
            tmp.write_text(json.dumps({**config, "meddiff_version": __version__}, indent=2) + "\n")
        return directory

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def check_sample_args(
        self,
        seeds: Sequence[int],
        steps: int = 50,
        scheduler: str = "ddim",
        class_labels: torch.Tensor | Sequence[int] | None = None,
        shape: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
        batch_size: int | None = None,
    ) -> None:
        """Refuse, with one clear line, any argument ``sample`` cannot use, before any work is done.

        ``generate`` and ``meddiff generate`` call it once for the whole run (``batch_size``: the
        largest batch), so a bad seed, label, shape or guidance never leaves a half-made output.
        """
        if self.config.get("max_train_timestep"):
            raise MeddiffError("this model was trained on low noise levels only (a denoising prior): it denoises images but cannot generate them")
        if self.config["unet"].get("concat_channels"):
            raise MeddiffError("this model takes a concatenated condition (e.g. a noisy image); sample it through its task pipeline")
        if len(seeds) == 0:
            raise MeddiffError("no seeds given: nothing to sample")
        values = (seeds[0], seeds[-1]) if isinstance(seeds, range) else seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds
        if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s <= MAX_SEED for s in values):
            raise MeddiffError(f"seeds must be whole numbers from 0 to {MAX_SEED} (image i uses seed + i) — choose a smaller --seed")
        train_steps = self.schedule.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= train_steps:
            raise MeddiffError(f"--steps must be a whole number from 1 to {train_steps} (the model's training timesteps), not {steps}")
        self.schedule.sampler(scheduler)  # unknown names and unsupported combinations fail here
        classes = self.config["unet"].get("num_class_embeds")
        if classes and class_labels is None:
            raise MeddiffError(f"this model is class-conditioned: give a class label from 0 to {classes - 1} (meddiff generate --class-label N)")
        if class_labels is not None:
            if not classes:
                raise MeddiffError("this model has no classes — leave out --class-label")
            try:
                labels = torch.as_tensor(class_labels)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise MeddiffError(f"class labels must be whole numbers from 0 to {classes - 1} for this model") from None
            if labels.ndim != 1 or len(labels) != len(seeds):
                raise MeddiffError(f"give one class label per image ({len(seeds)}), not {tuple(labels.shape)}")
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise MeddiffError(f"class labels must be whole numbers, not {labels.dtype}")
            bad = labels[(labels < 0) | (labels >= classes)].unique().tolist()
            if bad:
                raise MeddiffError(f"class label {bad[0]} is out of range: this model has classes 0 to {classes - 1}")
        try:
            guidance = float(guidance_scale)
        except (TypeError, ValueError):
            guidance = math.nan
        if not (math.isfinite(guidance) and guidance >= 0):
            raise MeddiffError(f"--guidance-scale must be a finite number >= 0 (1 conditional, 0 unconditional, > 1 stronger), not {guidance_scale}")
        conditioned = "text_encoder" in self.config
        if not conditioned and (prompts is not None or guidance != 1.0 or negative_prompt):
            given = "prompts" if prompts is not None else "--guidance-scale" if guidance != 1.0 else "--negative-prompt"
            raise MeddiffError(f"this model has no text encoder: it takes no {given} — leave it out, or use a report-conditioned model")
        if conditioned:
            if prompts is None or len(prompts) != len(seeds):
                raise MeddiffError(f"this model is report-conditioned: give one prompt per image ({len(seeds)}), e.g. meddiff generate --prompt TEXT")
            self.text_encoder  # noqa: B018 - loads the encoder now, so a broken one fails before any work
        self._check_shape(shape, min(batch_size or len(seeds), len(seeds)) * (2 if conditioned and guidance not in (0.0, 1.0) else 1))

    def _check_shape(self, shape: Sequence[int] | None, batch: int) -> None:
        """The sample shape fits the UNet (one size per spatial axis, divisible by its down-sampling) and memory."""
        dims, channels = self.config["unet"]["spatial_dims"], self.config["unet"].get("channels") or [1]
        shape = list(shape or self.config["image"]["shape"])
        multiple = 2 ** (len(channels) - 1)
        if len(shape) != dims or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 or s % multiple for s in shape):
            raise MeddiffError(f"sample shape {shape} does not fit this {dims}D model: give {dims} sizes, each a positive multiple of {multiple}")
        # the first level's feature maps alone (float32) must fit in this machine's memory; the real need is larger
        need = batch * math.prod(int(s) for s in shape) * int(channels[0]) * 4
        memory = physical_memory()
        if memory is not None and need > memory:
            raise MeddiffError(f"a batch of {batch} images of shape {shape} needs more than {need / 2**30:.0f} GiB; "
                               f"this machine has {memory / 2**30:.0f} GiB — use a smaller --batch-size or a smaller image shape")

    @torch.inference_mode()
    def sample(
        self,
        seeds: Sequence[int],
        steps: int = 50,
        scheduler: str = "ddim",
        class_labels: torch.Tensor | None = None,
        shape: Sequence[int] | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> torch.Tensor:
        """Denoise from pure noise; one generator per item, so item ``i`` depends only on ``seeds[i]``.

        Report-conditioned models take one prompt per seed. Classifier-free guidance: the prediction
        is ``uncond + guidance_scale * (cond - uncond)``, with ``negative_prompt`` (default: the empty
        report) as the unconditional side, both evaluated in one batch; 1 is plain conditional
        sampling, 0 unconditional.
        """
        self.check_sample_args(seeds, steps, scheduler, class_labels, shape, prompts, guidance_scale, negative_prompt)
        context = None
        if "text_encoder" in self.config:
            if guidance_scale == 0.0:  # uncond + 0 * (cond - uncond): the unconditional half alone
                prompts, guidance_scale = [negative_prompt] * len(seeds), 1.0
            cond = self.text_encoder.context(list(prompts))
            if guidance_scale != 1.0:
                cond = torch.cat([self.text_encoder.context([negative_prompt] * len(seeds)), cond])
            context = cond.to(self.device)
        sampler = self.schedule.sampler(scheduler)
        sampler.set_timesteps(steps)  # timesteps stay on the CPU: indexing schedule tables never syncs a GPU
        shape = tuple(shape or self.config["image"]["shape"])
        generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        x = randn_tensor((len(seeds), self.config["unet"].get("out_channels", 1), *shape), generator=generators, device=self.device)
        x = x * sampler.init_noise_sigma
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels).to(self.device)
        # as diffusers pipelines do: only stochastic samplers take a generator in step()
        extra = {"generator": generators} if "generator" in inspect.signature(sampler.step).parameters else {}
        guided = context is not None and guidance_scale != 1.0
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(x, t)
            if guided:  # unconditional and conditional halves in one batch
                both = self.unet(torch.cat([model_input] * 2), timesteps=t.to(self.device).expand(2 * len(seeds)),
                                 class_labels=None if class_labels is None else torch.cat([class_labels] * 2), context=context)
                uncond, cond = both.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            else:
                prediction = self.unet(model_input, timesteps=t.to(self.device).expand(len(seeds)), class_labels=class_labels, context=context)
            x = sampler.step(prediction, t, x, **extra).prev_sample
        return x

    def to_image(self, x: torch.Tensor) -> Image:
        """One sample (C, *spatial) in [-1, 1] -> an ``Image`` in physical units and training spacing."""
        info = self.config["image"]
        low, high = info.get("intensity_range", (-1.0, 1.0))
        array = from_model_range(x[0].float().cpu().numpy(), low, high)
        spacing = list(info.get("spacing") or [1.0] * array.ndim)
        return Image(array=array, affine=np.diag([*spacing[: array.ndim], *[1.0] * (4 - array.ndim)]), modality=info.get("modality"))

    @torch.inference_mode()
    def denoise(
        self,
        image: Image,
        noise_sigma: float | None = None,
        steps: int = 1,
        samples: int = 1,
        seed: int = 0,
        batch_size: int = 8,
        strength: float | None = None,
        mask: np.ndarray | None = None,
        rician_correction: bool = True,
        progress: bool = True,
    ) -> Image:
        """Denoise a magnitude MR ``image``; geometry, units and metadata of the input are kept.

        ``noise_sigma`` (image units) is estimated from the image when None. The model is asked to
        remove ``strength * noise_sigma``: a prior learnt from a few brains over-smooths the texture
        of other scans, and a strength below 1 (the model's ``denoise_strength``, chosen on held-out
        validation data) undoes that. ``mask`` (the image's shape): only voxels inside it change.

        The network only ever sees tiles of the model's ``denoise_tile`` (default: its training
        shape), ``batch_size`` tiles per call, overlapping by a quarter and blended with Gaussian
        weights (MONAI sliding-window inference): memory stays flat in the image size and time grows
        with the number of pixels, whatever the image. A 2D model runs slice by slice across a
        singleton axis (a 2D image stored as a volume) or else the thickest voxel axis; a 3D model
        tiles the volume. 4D images are denoised volume by volume. ``progress``: a progress bar
        (tiles) when denoising takes more than a moment. ``rician_correction``: remove the Rician noise
        floor of magnitude MR from the result (``meddiff.diffusion.rician``).
        """
        image.check_finite()
        if np.ptp(image.array) == 0:
            raise MeddiffError("the image is constant (for example all zero): there is nothing to denoise")
        if mask is not None and np.shape(mask) not in (image.array.shape, image.array.shape[:3]):
            raise MeddiffError(f"the mask has shape {np.shape(mask)}, the image {image.array.shape}")
        if noise_sigma is not None and not (math.isfinite(noise_sigma) and noise_sigma > 0):
            raise MeddiffError(f"the noise sigma must be a positive number in image units, not {noise_sigma} — give the noise level or let it be estimated")
        strength = self.config.get("denoise_strength", 1.0) if strength is None else float(strength)
        if not (math.isfinite(strength) and strength > 0):
            raise MeddiffError(f"strength must be a positive number, not {strength} — e.g. 1 removes the whole noise sigma")
        if steps < 1 or samples < 1:
            raise MeddiffError("--steps and --samples must be at least 1")
        if image.array.ndim == 4:
            volumes = [
                self.denoise(Image(image.array[..., v], image.affine, image.modality), noise_sigma, steps, samples, seed, batch_size,
                             strength, None if mask is None else (mask if np.ndim(mask) == 3 else mask[..., v]), progress=progress,
                             rician_correction=rician_correction).array
                for v in range(image.array.shape[3])
            ]
            return Image(np.stack(volumes, axis=-1), image.affine, image.modality, dict(image.meta))
        axis = self._slice_axis(image)
        plane = [n for a, n in enumerate(image.array.shape) if a != axis]
        if min(plane) < MIN_DENOISE_SIDE:
            raise MeddiffError(f"the image is too small to denoise: {' x '.join(map(str, image.array.shape))} voxels "
                               f"(each side of a slice needs at least {MIN_DENOISE_SIDE})")
        sigma = self._estimate_sigma(image.array) if noise_sigma is None else float(noise_sigma)
        if not sigma > 0:
            raise MeddiffError("no noise found in the image (estimated sigma 0): nothing to denoise, or give --noise-sigma")
        low, high = NormalizeIntensityd("image").intensity_range(torch.from_numpy(image.array), "MR")
        # to_model_range in place on one float32 copy: a long volume is not copied once per operator
        y = torch.tensor(image.array, dtype=torch.float32, device=self.device).sub_(low).mul_(2.0 / (high - low)).sub_(1.0)
        sigma_n = 2.0 * strength * sigma / (high - low)
        run = lambda x: denoise_tensor(self.unet, self.schedule, x, sigma_n, steps, samples, seed, self.config.get("max_train_timestep"))
        if self.config["unet"]["spatial_dims"] == 3:
            if y.ndim != 3:
                raise MeddiffError(f"this 3D model denoises volumes; the image has shape {tuple(y.shape)}")
            out = self._tiled(y[None, None], run, batch_size, progress)[0, 0]
        elif y.ndim == 2:
            out = self._denoise_planes(y[None], run, batch_size, progress)[0]
        else:
            out = torch.movedim(self._denoise_planes(torch.movedim(y, axis, 0), run, batch_size, progress), 0, axis)
        del y
        array = out.float().cpu().add_(1.0).mul_((high - low) / 2.0).add_(low).numpy()  # from_model_range, in place
        array = correct_rician_bias(array, sigma, image, rician_correction)
        if mask is not None:
            array = np.where(np.asarray(mask, dtype=bool), array, image.array).astype(np.float32)
        return Image(array, image.affine, image.modality, dict(image.meta))

    @staticmethod
    def _estimate_sigma(array: np.ndarray, max_slices: int = 32) -> float:
        """The noise sigma of ``array`` from at most ``max_slices`` evenly spaced slices along its last
        axis (the estimator's own planes): the noise of a scan is the same in all of them, and the
        estimator works in float64 with filtered copies, gigabytes for a 512x512x300 volume.
        A 2D image stored as a volume (x, y, 1) is estimated as the 2D image it is."""
        array = np.squeeze(array)
        if array.ndim == 3 and array.shape[2] > max_slices:
            array = array[..., np.linspace(0, array.shape[2] - 1, max_slices).round().astype(int)]
        return estimate_noise_sigma(array)

    @staticmethod
    def _slice_axis(image: Image) -> int | None:
        """The axis a 2D model runs across: a singleton axis (a 2D image stored as a volume, whatever
        its spacing), else the thickest voxel side, and among equally thick ones (isotropic voxels)
        the one with the fewest slices; None for a 2D array."""
        shape = image.array.shape
        if len(shape) == 2:
            return None
        singletons = [a for a, n in enumerate(shape) if n == 1]
        if singletons:
            return singletons[0]
        spacing = image.spacing
        return max(range(3), key=lambda a: (round(spacing[a], 3), -shape[a]))

    def _tile_geometry(self, spatial: Sequence[int]) -> tuple[list[int], list[int], int]:
        """(padded shape, tile, tiles per image) for an image of shape ``spatial``.

        Sides are padded up to what the UNet's levels can halve; the tile is the model's
        ``denoise_tile`` (else its training shape), shrunk to the padded image when that is smaller.
        The tile count repeats MONAI's sliding-window scan (``_get_scan_interval``, private) so the
        progress bar knows its total.
        """
        multiple = 2 ** (len(self.config["unet"]["channels"]) - 1)
        padded = [-(-int(s) // multiple) * multiple for s in spatial]
        tile = self.config.get("denoise_tile") or self.config["image"]["shape"]
        roi = [min(-(-int(t) // multiple) * multiple, p) for t, p in zip(tile, padded)]
        count = 1
        for p, r in zip(padded, roi):
            interval = r if r == p else max(int(r * (1 - DENOISE_OVERLAP)), 1)
            count *= -(-(p - r) // interval) + 1
        return padded, roi, count

    def _tiled(self, x: torch.Tensor, run, batch_size: int, progress: bool, bar=None) -> torch.Tensor:
        """``run`` over (B, 1, *spatial) ``x`` on blended tiles, ``batch_size`` tiles per call; same shape out."""
        spatial = list(x.shape[2:])
        padded, roi, count = self._tile_geometry(spatial)
        for dim, (size, target) in enumerate(zip(spatial, padded)):
            if target > size:  # at the end, as the halving needs; reflect when the side allows it
                pad = [0] * (2 * len(spatial))
                pad[2 * (len(spatial) - 1 - dim) + 1] = target - size
                x = torch.nn.functional.pad(x, pad, mode="reflect" if target - size < size else "replicate")
        own = bar is None
        if own:
            bar = tqdm(total=count * x.shape[0], desc="denoise", unit="tile", delay=2.0, disable=not progress)

        def counted(tiles: torch.Tensor) -> torch.Tensor:
            out = run(tiles)
            bar.update(tiles.shape[0])
            return out

        try:
            out = sliding_window_inference(x, roi, batch_size, counted, overlap=DENOISE_OVERLAP, mode="gaussian")
        finally:
            if own:
                bar.close()
        return out[(slice(None), slice(None), *[slice(0, s) for s in spatial])]

    def _denoise_planes(self, planes: torch.Tensor, run, batch_size: int, progress: bool = False) -> torch.Tensor:
        """Denoise (N, H, W) planes on tiles; as many planes per call as ``batch_size`` tiles hold,
        written into one output tensor, so memory does not grow with the number of planes."""
        _, _, count = self._tile_geometry(planes.shape[1:])
        per_call = max(1, batch_size // count)
        out = torch.empty(planes.shape, dtype=torch.float32, device=planes.device)
        with tqdm(total=count * planes.shape[0], desc="denoise", unit="tile", delay=2.0, disable=not progress) as bar:
            for start in range(0, planes.shape[0], per_call):
                stop = min(start + per_call, planes.shape[0])
                out[start:stop] = self._tiled(planes[start:stop, None], run, batch_size, progress, bar)[:, 0]
        return out

    def generate(
        self,
        n: int = 1,
        steps: int = 50,
        scheduler: str = "ddim",
        seed: int = 0,
        batch_size: int = 8,
        class_labels: Sequence[int] | None = None,
        progress: bool = True,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str = "",
    ) -> list[Image]:
        """``n`` images; image ``i`` uses seed ``seed + i`` (and ``prompts[i]``), whatever the batch size."""
        check_counts({"n": n, "batch_size": batch_size, "seed": seed})
        if class_labels is not None and len(class_labels) != n:
            raise MeddiffError(f"{len(class_labels)} class labels given for {n} images")
        if prompts is not None and len(prompts) != n:
            raise MeddiffError(f"{len(prompts)} prompts given for {n} images")
        self.check_sample_args(range(seed, seed + n), steps, scheduler, class_labels, None, prompts, guidance_scale, negative_prompt, batch_size)
        images = []
        for start in tqdm(range(0, n, batch_size), disable=not progress, desc="generate", unit="batch"):
            stop = min(n, start + batch_size)
            labels = None if class_labels is None else torch.as_tensor(list(class_labels[start:stop]))
            batch_prompts = None if prompts is None else list(prompts[start:stop])
            x = self.sample(range(seed + start, seed + stop), steps=steps, scheduler=scheduler, class_labels=labels,
                            prompts=batch_prompts, guidance_scale=guidance_scale, negative_prompt=negative_prompt)
            images.extend(self.to_image(item) for item in x)
        return images


def check_counts(counts: dict[str, int]) -> None:
    """Each of ``{name: value}`` is a whole number, at least 1 (0 for a seed): the image count, batch size and seed."""
    for name, value in counts.items():
        least = 0 if name.lstrip("-") == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise MeddiffError(f"{name} must be a whole number >= {least}, not {value!r}")


BUNDLED_MODELS = Path(__file__).parent / "models"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package (``meddiff/models/<name>/``)."""
    return sorted(p.name for p in BUNDLED_MODELS.iterdir() if (p / CONFIG_NAME).is_file())


def load_pipeline(name_or_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionPipeline:
    """A bundled model by name (``"mri-denoise"``) or a folder written by ``save_pretrained`` / ``meddiff export``.

    A folder of that name wins over a bundled model, so a user's own ``mri-denoise/`` is never shadowed.
    """
    path = Path(name_or_dir)
    if not path.exists() and str(name_or_dir) in bundled_models():
        path = BUNDLED_MODELS / str(name_or_dir)
    if not path.exists():
        raise MeddiffError(f"no model {name_or_dir!r}: neither a folder nor a bundled model ({', '.join(bundled_models())})")
    return DiffusionPipeline.from_pretrained(path, device=device)
