"""The objective, once: forward process and targets equal diffusers' ``add_noise`` / ``get_velocity``, and
``predicted_x0`` inverts every target."""

from __future__ import annotations

import pytest
import torch

from meddiff.diffusion import objective
from meddiff.diffusion.schedulers import NoiseSchedule


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_forward_process_and_velocity_equal_diffusers(beta_schedule):
    scheduler = NoiseSchedule(beta_schedule=beta_schedule).training_scheduler()
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 8, 8, generator=generator), torch.randn(6, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    abar = scheduler.alphas_cumprod[t]
    assert torch.equal(objective.noised(x0, noise, abar), scheduler.add_noise(x0, noise, t))
    assert torch.equal(objective.target(x0, noise, abar, "v"), scheduler.get_velocity(x0, noise, t))
    assert objective.target(x0, noise, abar, "eps") is noise and objective.target(x0, noise, abar, "x0") is x0


@pytest.mark.parametrize("kind", objective.PREDICTIONS)
def test_predicted_x0_inverts_each_target(kind):
    scheduler = NoiseSchedule().training_scheduler()
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 1, 3, 8, 8, generator=generator), torch.randn(4, 1, 3, 8, 8, generator=generator)
    abar = scheduler.alphas_cumprod[torch.tensor([10, 200, 600, 900])]
    xt = objective.noised(x0, noise, abar)
    torch.testing.assert_close(
        objective.predicted_x0(objective.target(x0, noise, abar, kind), xt, abar, kind), x0, atol=1e-4, rtol=1e-4
    )
    one = float(abar[1])  # one value for the whole batch, as the denoiser passes it
    xt = objective.noised(x0, noise, one)
    torch.testing.assert_close(
        objective.predicted_x0(objective.target(x0, noise, one, kind), xt, one, kind), x0, atol=1e-4, rtol=1e-4
    )
