"""How to sample, as one frozen object: it travels from the CLI to the pipelines, into each generated
item's provenance, and back out of a folder's records to decide whether a rerun is the same run."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

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

    def checked(self, config: ModelConfig) -> SamplingSpec:
        """This spec for a model of ``config``, or one clear line saying what the model cannot do with it.

        A model without a text encoder takes no guidance: its spec records ``guidance_scale`` and
        ``negative_prompt`` as None (as records of earlier versions do).
        """
        if not config.generates:
            raise MeddiffError("this model was trained on low noise levels only (a denoising prior): "
                               "it denoises images but cannot generate or inpaint them")
        train_steps = config.schedule.num_train_timesteps
        if isinstance(self.steps, bool) or not 1 <= self.steps <= train_steps:
            raise MeddiffError(f"--steps must be a whole number from 1 to {train_steps} "
                               f"(the model's training timesteps), not {self.steps}")
        spec = self if self.scheduler else self.model_copy(update={"scheduler": config.schedule.default_sampler})
        config.schedule.check_sampler(spec.scheduler)  # unknown names and unsupported combinations fail here
        classes = config.unet.num_class_embeds
        if classes and spec.class_label is None:
            raise MeddiffError(f"this model is class-conditioned: give a class label from 0 to {classes - 1} "
                               "(meddiff generate --class-label N)")
        if spec.class_label is not None and not classes:
            raise MeddiffError("this model has no classes — leave out --class-label")
        if spec.class_label is not None and not 0 <= spec.class_label < classes:
            raise MeddiffError(f"class label {spec.class_label} is out of range: "
                               f"this model has classes 0 to {classes - 1}")
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
