"""Noise schedules and samplers by name, from diffusers' scheduler zoo.

Training and every sampler share one ``NoiseSchedule`` (timesteps, beta schedule, prediction type),
so a model trained once can be sampled with DDPM, DDIM, DPM-Solver++, Euler, UniPC or PNDM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from meddiff.errors import MeddiffError

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

# diffusers' default timestep spacings. "trailing" (start sampling at the last training timestep)
# was measured worse for DDIM-50 on the benchmark model (BENCHMARKS.md), so it is not forced here.
SAMPLERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
# Samplers that cannot use a model predicting x0 directly.
NO_X0 = {"pndm"}


@dataclass(frozen=True)
class NoiseSchedule:
    """What a model was trained with: ``beta_schedule`` linear | scaled_linear | cosine, ``prediction`` eps | v | x0."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "eps"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise MeddiffError(f"beta_schedule must be one of {list(BETA_SCHEDULES)}, not {self.beta_schedule!r}")
        if self.prediction not in PREDICTION_TYPES:
            raise MeddiffError(f"prediction must be one of {list(PREDICTION_TYPES)}, not {self.prediction!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    def diffusers_config(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": BETA_SCHEDULES[self.beta_schedule],
            "prediction_type": PREDICTION_TYPES[self.prediction],
        }

    def training_scheduler(self) -> DDPMScheduler:
        """The DDPM schedule whose ``alphas_cumprod`` the training loss (``diffusion.objective``) and denoising use."""
        return DDPMScheduler(**self.diffusers_config(), clip_sample=False)

    def sampler(self, name: str) -> SchedulerMixin:
        """A fresh sampler by name (see ``SAMPLERS``) matching this schedule."""
        self.check_sampler(name)
        cls, extra = SAMPLERS[name]
        config = self.diffusers_config()
        if cls in (DDPMScheduler, DDIMScheduler):
            config["clip_sample"] = False  # medical intensities may exceed [-1, 1] after normalisation
        return cls(**config, **extra)

    def check_sampler(self, name: str) -> None:
        """Refuse an unknown sampler name, or one this schedule's prediction type cannot use."""
        if name not in SAMPLERS:
            raise MeddiffError(f"unknown scheduler {name!r} — choose one of {', '.join(SAMPLERS)}")
        if self.prediction == "x0" and name in NO_X0:
            raise MeddiffError(f"scheduler {name!r} does not support x0-prediction models "
                               "— choose ddim, dpm++2m or another")
