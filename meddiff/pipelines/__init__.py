"""Task pipelines over one loaded model: ``generate`` (and from a label map: ``controlnet``), ``denoise``, ``inpaint``,
``edit``, ``upsample``.

Each task is a module of plain functions of a ``DiffusionModel``; ``DiffusionPipeline`` is the object a
user holds (``meddiff.load_pipeline("mri-denoise").denoise(image)``), one short method per task.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from meddiff.diffusion.adapt import Adaptation
from meddiff.image import Image
from meddiff.model import DiffusionModel, ModelConfig, load_model
from meddiff.pipelines import controlnet, denoise, edit, generate, inpaint
from meddiff.pipelines import upsample as upsampling
from meddiff.pipelines.edit import EditSpec
from meddiff.pipelines.spec import DenoiseSpec, SamplingSpec, spec_from
from meddiff.pipelines.upsample import UpsampleReport, UpsampleSpec
from meddiff.pipelines.volumes import check_modality

__all__ = ["DenoiseSpec", "DiffusionPipeline", "EditSpec", "SamplingSpec", "UpsampleSpec", "load_pipeline"]


class DiffusionPipeline:
    """A loaded model and the tasks it serves. Sampling options are a ``SamplingSpec`` (``spec=``) or its
    fields as keywords: ``pipeline.generate(4, steps=20, scheduler="dpm++2m")``."""

    def __init__(self, model: DiffusionModel):
        self.model = model

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionPipeline:
        return cls(DiffusionModel.from_pretrained(directory, device))

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        return self.model.save_pretrained(directory, overwrite)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.unet

    @unet.setter
    def unet(self, network: torch.nn.Module) -> None:
        self.model.unet = network

    @property
    def schedule(self):
        return self.model.schedule

    @property
    def device(self) -> torch.device:
        return self.model.device

    def sample(self, seeds: Sequence[int], spec: SamplingSpec | None = None, prompts: Sequence[str] | None = None,
               shape: Sequence[int] | None = None, condition: torch.Tensor | None = None,
               labels: torch.Tensor | None = None, **fields) -> torch.Tensor:
        """Samples in model units, one per seed (``generate.sample``)."""
        return generate.sample(self.model, spec or spec_from(**fields), seeds, prompts, shape, condition, labels)

    def generate(self, n: int = 1, spec: SamplingSpec | None = None, seed: int = 0, batch_size: int = 8,
                 prompts: Sequence[str] | None = None, progress: bool = True, labels: Image | None = None,
                 **fields) -> list[Image]:
        """``n`` images in physical units; image ``i`` uses seed ``seed + i`` (``generate.generate``). A
        ControlNet model takes ``labels``, a label map: the images then follow it, on its grid
        (``controlnet.generate_from_labels``)."""
        spec = spec or spec_from(**fields)
        if labels is not None:
            return controlnet.generate_from_labels(self.model, labels, spec, n, seed, batch_size, progress)
        return generate.generate(self.model, spec, n, seed, batch_size, prompts, progress)

    def load_adapter(self, directory: str | os.PathLike, scale: float = 1.0) -> DiffusionPipeline:
        """Apply a few-shot adapter folder (LoRA at ``scale``, 0: this model exactly; or a textual-inversion token)
        trained on this very model (``meddiff.adapters.apply_adapter``: any other base is refused); returns self."""
        from meddiff.adapters import apply_adapter

        apply_adapter(self.model, directory, scale)
        return self

    def to_image(self, x: torch.Tensor) -> Image:
        return generate.to_image(self.model, x)

    def denoise(self, image: Image, spec: DenoiseSpec | None = None, mask: np.ndarray | None = None,
                batch_size: int = 8, progress: bool = True, noise_map: np.ndarray | None = None, **fields) -> Image:
        """A denoised copy of a magnitude MR image (``denoise.denoise``). Options are a ``DenoiseSpec``
        (``spec=``) or its fields as keywords: ``pipeline.denoise(image, noise_sigma=5.0, steps=4)``;
        ``noise_map``: the noise sigma per voxel where it varies across the image (or ``local_noise=True``)."""
        check_modality(image, self.config, "denoising")
        return denoise.denoise(self.model, image, spec or spec_from(DenoiseSpec, **fields), mask, batch_size, progress,
                               noise_map)

    def adapt(self, image: Image, spec: DenoiseSpec | None = None, steps: int = DenoiseSpec.ADAPT_STEPS,
              **fields) -> tuple[DiffusionPipeline, Adaptation]:
        """A pipeline whose denoising prior is adapted to ``image`` (``denoise.adapt``: self-supervised, from the scan's
        own noise; kept only where it lowers a held-out loss), and what adapting did. Then, where it was kept,
        ``adapted.denoise(image, noise_sigma=adaptation.sigma)``: the sigma it adapted at (the scan's tissue sigma,
        unless given; ``denoise.spec_after`` applies that rule to a spec). Options as ``denoise`` takes them."""
        check_modality(image, self.config, "denoising")
        model, adaptation = denoise.adapt(self.model, image, spec or spec_from(DenoiseSpec, **fields), steps)
        return DiffusionPipeline(model), adaptation

    def denoise_report(self, image: Image, denoised: Image, spec: DenoiseSpec | None = None,
                       mask: np.ndarray | None = None, **fields) -> dict:
        """How ``denoised = pipeline.denoise(image, spec, mask)`` went, judged without a clean image: noise before
        and after, and whether the residual looks like noise (``denoise.report``); the same options."""
        return denoise.report(self.model, image, denoised, spec or spec_from(DenoiseSpec, **fields), mask)

    def inpaint(self, image: Image, mask: Image | np.ndarray, spec: inpaint.InpaintSpec | None = None, seed: int = 0,
                samples: int = 1, prompt: str | None = None, batch_size: int = 8, progress: bool = True,
                **fields) -> list[Image]:
        """``samples`` fills of the masked region, the rest of the image kept exactly (``inpaint.inpaint``)."""
        check_modality(image, self.config, "inpainting")
        if spec is None and "steps" not in fields and self.config.inpaint_steps:
            fields["steps"] = self.config.inpaint_steps  # the model's own default
        spec = spec or spec_from(inpaint.InpaintSpec, **fields)
        return inpaint.inpaint(self.model, image, mask, spec, seed, samples, prompt, batch_size, progress)

    def edit(self, image: Image, spec: EditSpec | None = None, mask: Image | np.ndarray | None = None, seed: int = 0,
             samples: int = 1, prompt: str | None = None, batch_size: int = 8, progress: bool = True,
             **fields) -> list[Image]:
        """``samples`` edits of ``image`` toward the prompt or class (SDEdit, ``edit.edit``): ``strength`` in (0, 1]
        (low: close to the input; 1: the condition alone); with ``mask`` the rest of the image is kept exactly.
        ``pipeline.edit(image, strength=0.5, prompt="...", guidance_scale=4.0)``."""
        return edit.edit(self.model, image, spec or spec_from(EditSpec, **fields), mask, seed, samples, prompt,
                         batch_size, progress)

    def upsample(self, image: Image, spec: UpsampleSpec | None = None, batch_size: int = 8, progress: bool = True,
                 **fields) -> tuple[Image, UpsampleReport]:
        """Thin slices between a volume's thick ones with this super-resolution model (``upsample.upsample``;
        ``method`` "auto" weighs it against a network trained on the scan and cubic): ``pipeline.upsample(volume,
        factor=4)``; the image and what was done. Without a model: ``meddiff.pipelines.upsample.upsample``."""
        check_modality(image, self.config, "super-resolution")
        return upsampling.upsample(image, spec or spec_from(UpsampleSpec, **fields), self.model, batch_size, progress)


def load_pipeline(name_or_dir: str | os.PathLike, device: str | torch.device = "cpu",
                  adapter: str | os.PathLike | None = None, adapter_scale: float = 1.0) -> DiffusionPipeline:
    """A bundled model by name (``"mri-denoise"``) or a model folder, ready for every task; with ``adapter`` (an
    adapter folder trained on it) applied at ``adapter_scale`` (``DiffusionPipeline.load_adapter``)."""
    pipeline = DiffusionPipeline(load_model(name_or_dir, device))
    return pipeline if adapter is None else pipeline.load_adapter(adapter, adapter_scale)
