"""How to sample, as one frozen object: it travels from the CLI to the pipelines, into each generated
item's provenance, and back out of a folder's records to decide whether a rerun is the same run."""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator

from meddiff.errors import MeddiffError
from meddiff.model import ModelConfig


class SamplingSpec(BaseModel):
    """Sampler and steps, the class label, and classifier-free guidance (for report-conditioned models:
    ``uncond + guidance_scale * (cond - uncond)``, with ``negative_prompt`` as the unconditional side)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: str | None = None  # None: the model's own (ddim; rflow for a rectified-flow model)
    steps: int = 50
    class_label: int | None = None
    guidance_scale: float | None = 1.0
    negative_prompt: str | None = ""
    condition_values: dict[str, float] | None = None  # scalar conditions by name (ModelConfig.scalars)

    def checked(self, config: ModelConfig) -> SamplingSpec:
        """This spec for a model of ``config``, or one clear line saying what the model cannot do with it.

        A model without a text encoder takes no guidance: its spec records ``guidance_scale`` and
        ``negative_prompt`` as None (as records of earlier versions do).
        """
        if not config.generates:
            raise MeddiffError("this model was trained on low noise levels only (a denoising prior): "
                               "it denoises images but cannot generate, inpaint or edit them")
        train_steps = config.schedule.num_train_timesteps
        if isinstance(self.steps, bool) or not 1 <= self.steps <= train_steps:
            raise MeddiffError(f"--steps must be a whole number from 1 to {train_steps} "
                               f"(the model's training timesteps), not {self.steps}")
        spec = self if self.scheduler else self.model_copy(update={"scheduler": config.schedule.default_scheduler})
        config.schedule.check_scheduler(spec.scheduler)  # unknown names and unsupported combinations fail here
        classes = config.unet.num_class_embeds
        if classes and spec.class_label is None:
            raise MeddiffError(f"this model is class-conditioned: give a class label from 0 to {classes - 1} "
                               "(meddiff generate --class-label N)")
        if spec.class_label is not None and not classes:
            raise MeddiffError("this model has no classes — leave out --class-label")
        if spec.class_label is not None and not 0 <= spec.class_label < classes:
            raise MeddiffError(f"class label {spec.class_label} is out of range: "
                               f"this model has classes 0 to {classes - 1}")
        if config.scalars is not None:  # every value, defaults filled in, so the provenance says what was used
            values = config.scalars.values(spec.condition_values)
            spec = spec.model_copy(update={"condition_values": dict(zip(config.scalars.names, values, strict=True))})
        elif spec.condition_values:
            raise MeddiffError("this model takes no condition values — leave out --condition-values")
        if config.text_encoder is None:
            if spec.guidance_scale not in (None, 1.0) or spec.negative_prompt:
                given = "--guidance-scale" if spec.guidance_scale not in (None, 1.0) else "--negative-prompt"
                raise MeddiffError(f"this model has no text encoder: it takes no {given} — leave it out, or use a "
                                   "report-conditioned model")
            return spec.model_copy(update={"guidance_scale": None, "negative_prompt": None})
        scale = math.nan if spec.guidance_scale is None else spec.guidance_scale
        if not (math.isfinite(scale) and scale >= 0):
            raise MeddiffError(f"--guidance-scale must be a finite number >= 0 (1 conditional, 0 unconditional, "
                               f"> 1 stronger), not {spec.guidance_scale}")
        return spec.model_copy(update={"negative_prompt": spec.negative_prompt or ""})

    @property
    def guided(self) -> bool:
        """Whether each step evaluates the network twice (conditional and unconditional halves)."""
        return self.guidance_scale not in (None, 0.0, 1.0)


def spec_from(cls: type[SamplingSpec] = SamplingSpec, **fields) -> SamplingSpec:
    """A spec of ``cls`` from keyword arguments, a bad value refused in one line (for the Python API)."""
    from pydantic import ValidationError

    try:
        return cls(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise MeddiffError(f"{'.'.join(map(str, error['loc']))}: {error['msg']}") from None


class DenoiseSpec(BaseModel):
    """How to denoise, as one frozen object: it travels from the CLI to the loop, into the DICOM description of a
    derived series, and is checked once (``checked``).

    ``noise_sigma`` (image units; None: estimated from the image) times ``strength`` (None: the model's calibrated
    ``denoise_strength``) is the noise the model removes; ``steps`` 1 is the posterior-mean estimate, more runs the
    reverse process and averages ``samples`` runs from ``seed``; ``rician_correction`` removes magnitude MR's noise
    floor, Rician for one coil, noncentral chi for ``coils`` root-sum-of-squares channels; ``local_noise`` estimates
    a map of noise that varies across the image and matches each tile to its own (``diffusion.noise_map``);
    ``across_volumes`` denoises a 4D series with its other volumes as context; ``tile`` (None: the model's
    ``denoise_tile``, else its training shape) is what the network sees at once.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = 1
    samples: int = 1
    strength: float | None = None
    seed: int = 0
    noise_sigma: float | None = None
    rician_correction: bool = True
    coils: int = 1
    local_noise: bool = False
    across_volumes: bool = False
    tile: tuple[int, ...] | None = None

    MAX_STRENGTH: ClassVar[float] = 2.0  # beyond twice the noise sigma the estimate removes anatomy, not noise
    MAX_STEPS: ClassVar[int] = 1000
    MAX_SAMPLES: ClassVar[int] = 64  # more adds time, not a better estimate
    MAX_COILS: ClassVar[int] = 128  # receive channels of a root-sum-of-squares magnitude image
    ADAPT_STEPS: ClassVar[int] = 40  # per-scan adaptation (--adapt): the held-out loss levels off within this
    MAX_ADAPT_STEPS: ClassVar[int] = 1000

    @model_validator(mode="after")
    def _in_range(self) -> DenoiseSpec:
        """Every range that does not depend on the model, checked as the spec is made (before any work)."""
        if not 1 <= self.steps <= self.MAX_STEPS or not 1 <= self.samples <= self.MAX_SAMPLES:
            raise MeddiffError(f"--steps must be 1 to {self.MAX_STEPS} and --samples 1 to {self.MAX_SAMPLES}, not "
                               f"{self.steps} and {self.samples} — --steps 1 gives the posterior-mean estimate")
        if self.noise_sigma is not None and not (math.isfinite(self.noise_sigma) and self.noise_sigma > 0):
            raise MeddiffError(f"the noise sigma must be a positive number in image units, not {self.noise_sigma} "
                               "— give the noise level's standard deviation, or let it be estimated")
        if self.strength is not None:
            _check_strength(self.strength)
        if not 1 <= self.coils <= self.MAX_COILS:
            raise MeddiffError(f"--coils must be a whole number from 1 to {self.MAX_COILS} (the receive channels "
                               f"combined by root-sum-of-squares; 1: Rician), not {self.coils}")
        if not 0 <= self.seed < 2**32:
            raise MeddiffError(f"--seed must be a whole number from 0 to {2**32 - 1}, not {self.seed}")
        return self

    def checked(self, config: ModelConfig) -> DenoiseSpec:
        """This spec with the model's defaults filled in (its strength and tile), or one clear line when they do
        not fit."""
        strength = config.denoise_strength if self.strength is None else self.strength
        _check_strength(strength)
        tile = self.tile or config.denoise_tile or config.image.shape
        if len(tile) != config.unet.spatial_dims or any(side < 1 or side % config.unet.size_multiple for side in tile):
            raise MeddiffError(f"the tile {list(tile)} does not fit this {config.unet.spatial_dims}D model: give "
                               f"{config.unet.spatial_dims} sizes, each a multiple of {config.unet.size_multiple}")
        return self.model_copy(update={"strength": float(strength), "tile": tuple(int(side) for side in tile)})

    def description(self) -> str:
        """The settings in words, for a derived series' DerivationDescription."""
        sigma = "estimated" if self.noise_sigma is None else f"{self.noise_sigma:g}"
        return (f"steps {self.steps}, samples {self.samples}, seed {self.seed}, noise sigma {sigma}, strength "
                f"{self.strength if self.strength is not None else 'the model default'}, Rician correction "
                f"{'on' if self.rician_correction else 'off'}" + (f", {self.coils} coils" if self.coils > 1 else "")
                + (", noise map estimated" if self.local_noise else "")
                + (", across volumes" if self.across_volumes else ""))


def _check_strength(strength: float) -> None:
    if not (math.isfinite(strength) and 0 < strength <= DenoiseSpec.MAX_STRENGTH):
        raise MeddiffError(f"--strength must be a number in (0, {DenoiseSpec.MAX_STRENGTH:g}], not {strength} — 1 "
                           "removes the whole noise sigma; or leave it out for the model's own value")


def check_adapt_steps(steps: int) -> None:
    """One line unless ``steps`` is a whole number of adaptation steps in range (``--adapt STEPS``)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= DenoiseSpec.MAX_ADAPT_STEPS:
        raise MeddiffError(f"--adapt takes 1 to {DenoiseSpec.MAX_ADAPT_STEPS} steps, not {steps}")
