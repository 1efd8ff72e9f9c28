"""Noise schedules and schedulers by name: diffusers' scheduler zoo and MONAI's rectified flow.

Training and every scheduler share one ``NoiseSchedule``. Its ``kind`` "ddpm" (timesteps, beta schedule,
prediction type) is sampled with DDPM, DDIM, DPM-Solver++, Euler, UniPC or PNDM; its ``kind`` "rflow"
(rectified flow, Liu et al. 2023, as MAISI v2 uses it) trains a velocity ``x0 - noise`` on the straight line
from the image to the noise and is sampled with MONAI's ``RFlowScheduler`` (Euler steps along that line).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from meddiff.diffusion import objective
from meddiff.errors import MeddiffError

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
# the other way: a published scheduler config's names -> meddiff's
BETA_SCHEDULE_OF = {name: ours for ours, name in BETA_SCHEDULES.items()}
PREDICTION_OF = {name: ours for ours, name in PREDICTION_TYPES.items()}

# diffusers' default timestep spacings. "trailing" (start sampling at the last training timestep)
# was measured worse for DDIM-50 on the benchmark model (BENCHMARKS.md), so it is not forced here.
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
}
# Samplers that cannot use a model predicting x0 directly.
NO_X0 = {"pndm"}
SCHEDULE_KINDS = ("ddpm", "rflow")
RFLOW_SCHEDULER = "rflow"
RFLOW_TIMESTEP_SAMPLING = ("uniform", "logit-normal")


@dataclass(frozen=True)
class NoiseSchedule:
    """What a model was trained with: ``beta_schedule`` linear | scaled_linear | cosine, ``prediction`` eps | v | x0
    (``kind`` "ddpm"); or ``kind`` "rflow", whose network predicts the flow velocity ``x0 - noise`` (``prediction``
    "v") at timesteps drawn ``timestep_sampling`` uniform or logit-normal (Esser et al. 2024)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction: str = "eps"
    kind: str = "ddpm"
    timestep_sampling: str = "uniform"
    beta_start: float = 0.0001  # diffusers' defaults; MAISI v1: 0.0015 .. 0.0195, scaled_linear
    beta_end: float = 0.02
    clip_sample: bool = False  # DDPM/DDIM clip their x0 estimate to [-1, 1] (as MONAI's schedulers do by default)
    # where the sampling steps fall (diffusers' leading | linspace | trailing); None: each sampler's own default.
    # MONAI's DDIMScheduler (1.6) spaces them as linspace: imported MONAI bundles sample as they do.
    timestep_spacing: str | None = None
    # diffusers' further DDPM-family settings (Stable Diffusion: steps_offset 1, set_alpha_to_one False); None: each
    # sampler's own default
    steps_offset: int | None = None
    set_alpha_to_one: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise MeddiffError(f"schedule kind must be one of {list(SCHEDULE_KINDS)}, not {self.kind!r}")
        if self.kind == "rflow" and self.prediction != "v":
            raise MeddiffError("a rectified-flow schedule predicts the velocity: prediction must be v")
        if self.timestep_sampling not in RFLOW_TIMESTEP_SAMPLING or (
                self.kind == "ddpm" and self.timestep_sampling != "uniform"):
            raise MeddiffError(f"timestep_sampling must be uniform (or logit-normal for kind rflow), "
                               f"not {self.timestep_sampling!r}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise MeddiffError(f"beta_schedule must be one of {list(BETA_SCHEDULES)}, not {self.beta_schedule!r}")
        if self.timestep_spacing not in (None, "leading", "linspace", "trailing"):
            raise MeddiffError(f"timestep_spacing must be leading, linspace or trailing, not {self.timestep_spacing!r}")
        if self.prediction not in PREDICTION_TYPES:
            raise MeddiffError(f"prediction must be one of {list(PREDICTION_TYPES)}, not {self.prediction!r}")

    @property
    def default_scheduler(self) -> str:
        return RFLOW_SCHEDULER if self.kind == "rflow" else "ddim"

    def draw_timesteps(self, n: int, generator: torch.Generator, device: torch.device | str,
                       below: int | None = None) -> torch.Tensor:
        """``n`` training timesteps from ``generator``: integers in ``[0, below or T)`` for DDPM; for rectified
        flow continuous ones in ``[0, T)``, uniform or logit-normal as MONAI's ``RFlowScheduler.sample_timesteps``
        draws them (drawn here so that a seeded generator, not the global one, decides them)."""
        if self.kind == "ddpm":
            return torch.randint(0, below or self.num_train_timesteps, (n,), generator=generator, device=device)
        if self.timestep_sampling == "uniform":
            share = torch.rand(n, generator=generator, device=device)
        else:
            share = torch.sigmoid(torch.randn(n, generator=generator, device=device))
        return share * self.num_train_timesteps

    def noised_and_target(self, x0: torch.Tensor, noise: torch.Tensor,
                          t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's input ``x_t`` and what it must predict there, for this schedule."""
        if self.kind == "rflow":
            share = t.float() / self.num_train_timesteps
            return objective.flow_noised(x0, noise, share), objective.flow_velocity(x0, noise)
        abar = _alphas_cumprod(self).to(x0.device)[t]
        return objective.noised(x0, noise, abar), objective.target(x0, noise, abar, self.prediction)

    def diffusers_config(self) -> dict:
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": BETA_SCHEDULES[self.beta_schedule],
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "prediction_type": PREDICTION_TYPES[self.prediction],
        }

    def training_scheduler(self) -> DDPMScheduler:
        """The DDPM schedule whose ``alphas_cumprod`` the training loss (``diffusion.objective``) and denoising use."""
        return DDPMScheduler(**self.diffusers_config(), clip_sample=False)

    def scheduler(self, name: str) -> SchedulerMixin | RectifiedFlowScheduler:
        """A fresh scheduler by name (``SCHEDULERS``; ``--scheduler`` on the command line) for this schedule."""
        self.check_scheduler(name)
        if self.kind == "rflow":
            return RectifiedFlowScheduler(self.num_train_timesteps)
        cls, extra = SCHEDULERS[name]
        config = self.diffusers_config()
        if cls in (DDPMScheduler, DDIMScheduler):
            # off unless the model says so: medical intensities may exceed [-1, 1] after normalisation
            config["clip_sample"] = self.clip_sample
        if self.timestep_spacing is not None:
            config["timestep_spacing"] = self.timestep_spacing
        for name in ("steps_offset", "set_alpha_to_one"):
            if getattr(self, name) is not None:
                config[name] = getattr(self, name)
        accepted = inspect.signature(cls.__init__).parameters  # each sampler takes the settings it knows
        return cls(**{k: v for k, v in config.items() if k in accepted}, **extra)

    def check_scheduler(self, name: str) -> None:
        """Refuse an unknown scheduler name, or one this schedule's prediction type cannot use."""
        if self.kind == "rflow":
            if name != RFLOW_SCHEDULER:
                raise MeddiffError(f"this model was trained with rectified flow: sample it with --scheduler "
                                   f"{RFLOW_SCHEDULER}, not {name!r}")
            return
        if name == RFLOW_SCHEDULER:
            raise MeddiffError("scheduler rflow samples rectified-flow models only; this one is a DDPM-family model "
                               f"— choose one of {', '.join(SCHEDULERS)}")
        if name not in SCHEDULERS:
            raise MeddiffError(f"unknown scheduler {name!r} — choose one of {', '.join(SCHEDULERS)}")
        if self.prediction == "x0" and name in NO_X0:
            raise MeddiffError(f"scheduler {name!r} does not support x0-prediction models "
                               "— choose ddim, dpm++2m or another")


@functools.cache
def _alphas_cumprod(schedule: NoiseSchedule) -> torch.Tensor:
    return schedule.training_scheduler().alphas_cumprod


class RectifiedFlowScheduler:
    """MONAI's ``RFlowScheduler`` behind the interface ``sample_loop`` drives (diffusers': ``set_timesteps``,
    ``timesteps``, ``scale_model_input``, ``step(...).prev_sample``), so one loop samples both families.
    The adapter is ours because MONAI's ``step`` needs the next timestep and returns a tuple."""

    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000):
        from monai.networks.schedulers import RFlowScheduler

        self.scheduler = RFlowScheduler(num_train_timesteps)
        self.timesteps = torch.empty(0)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.timesteps = self.scheduler.timesteps

    def scale_model_input(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x0`` at timesteps ``t`` (one, or one per item) on the straight line to ``noise`` (a start part-way)."""
        return self.scheduler.add_noise(x0, noise, t)

    def step(self, prediction: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> SimpleNamespace:
        later = self.timesteps[self.timesteps < t]
        next_t = int(later[0]) if len(later) else 0
        return SimpleNamespace(prev_sample=self.scheduler.step(prediction, int(t), x, next_t)[0])
