"""Noise-level-matched denoising with a diffusion model (the matching DDM2, Xiang et al. 2023, uses).

A noisy image ``y = x0 + sigma * eps`` (in the model's [-1, 1] units) scaled by ``sqrt(abar_t)`` is a
forward-process sample at the timestep whose noise matches ``sigma``. One network evaluation there
gives the posterior-mean estimate of ``x0`` (``steps=1``, best PSNR); ``steps > 1`` runs the
ancestral reverse process from that timestep to 0 and ``samples`` such runs are averaged.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler

from meddiff.diffusion.noise_level import timestep_for_sigma
from meddiff.diffusion.objective import predicted_x0
from meddiff.diffusion.sampling import sample_loop, unet_function
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError


def matched_x0(unet: torch.nn.Module, schedule: NoiseSchedule, y: torch.Tensor,
               sigma: float | torch.Tensor) -> torch.Tensor:
    """The posterior-mean estimate of ``x0`` from ``y`` with noise ``sigma`` (one value, or one per item: tiles of a
    noise map): one network evaluation at the matching timestep (differentiable: per-scan adaptation trains
    through it)."""
    abar = schedule.training_scheduler().alphas_cumprod
    sigmas = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).tolist()
    if len(sigmas) == 1:  # in Python floats, as before noise maps: the pinned full-loop values stay bit for bit
        t = timestep_for_sigma(sigmas[0], abar.numpy())
        xt = float(abar[t]) ** 0.5 * y
        return predicted_x0(unet_function(unet)(xt, torch.tensor(t)), xt, float(abar[t]), schedule.prediction)
    t = torch.tensor([timestep_for_sigma(s, abar.numpy()) for s in sigmas])
    a = abar[t].to(y.device, y.dtype)
    xt = a.reshape(-1, *[1] * (y.ndim - 1)) ** 0.5 * y
    return predicted_x0(unet_function(unet)(xt, t), xt, a, schedule.prediction)


@torch.inference_mode()
def denoise_tensor(unet: torch.nn.Module, schedule: NoiseSchedule, y: torch.Tensor, sigma: float | torch.Tensor,
                   steps: int = 1, samples: int = 1, seed: int = 0,
                   max_timestep: int | None = None) -> torch.Tensor:
    """Denoise ``y`` (B, C, *spatial, in [-1, 1] units) whose noise std is ``sigma`` in those units (one value, or
    one per item with ``steps`` 1).

    ``max_timestep``: the model only learnt timesteps below it; a noisier image is refused.
    """
    if steps < 1 or samples < 1:
        raise MeddiffError("--steps and --samples must be at least 1")
    abar = schedule.training_scheduler().alphas_cumprod
    largest = float(torch.as_tensor(sigma).max())
    t = timestep_for_sigma(largest, abar.numpy())
    if max_timestep is not None and t >= max_timestep:
        limit = float(((1 - abar[max_timestep - 1]) / abar[max_timestep - 1]) ** 0.5)
        raise MeddiffError(f"the noise to remove (sigma {largest / 2:.1%} of the intensity range, after --strength) "
                           f"is beyond what this model learnt (up to {limit / 2:.1%})")
    if steps == 1:
        return matched_x0(unet, schedule, y, sigma)
    scale, model = float(abar[t]) ** 0.5, unet_function(unet)
    total = torch.zeros_like(y)
    for k in range(samples):
        sampler = DDPMScheduler(**schedule.diffusers_config(), clip_sample=False)
        sampler.set_timesteps(timesteps=sorted({int(v) for v in np.linspace(t, 0, steps).round()}, reverse=True))
        total += sample_loop(model, scale * y, sampler, generator=torch.Generator(y.device).manual_seed(seed + k),
                             from_noise=False)
    return total / samples
