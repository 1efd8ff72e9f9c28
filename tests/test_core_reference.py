"""The sampling loop against the references of the field, on the same network and the same noise.

As diffusers tests its schedulers: meddiff's DDPM, DDIM and DPM-Solver++ sampling equals diffusers'
own unconditional pipeline loop and MONAI's ``DiffusionInferer.sample`` (DDPM, DDIM), the guidance
formula is checked with a stub network, and one full-loop value is pinned.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMPipeline
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM

from meddiff.model import DiffusionModel, TextEncoderConfig
from meddiff.pipelines import DiffusionPipeline
from meddiff.training import DiffusionModule

SIZE = 16
TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)
MONAI_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def tiny_pipeline(prediction: str = "eps", num_train_timesteps: int = 1000) -> DiffusionPipeline:
    torch.manual_seed(0)
    module = DiffusionModule(image_shape=(SIZE, SIZE), prediction=prediction, num_train_timesteps=num_train_timesteps,
                             **TINY)
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.02)
    return module.pipeline(ema=False)


class DiffusersInterface(torch.nn.Module):
    """The MONAI UNet behind the call signature and config diffusers' pipelines use."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.config = SimpleNamespace(sample_size=SIZE, in_channels=1)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.unet(x, timesteps=t.expand(x.shape[0])))


@pytest.mark.parametrize(
    ("scheduler", "prediction"), [("ddpm", "eps"), ("ddim", "v"), ("dpm++2m", "eps"), ("dpm++2m", "v")]
)
def test_sampling_equals_the_diffusers_pipeline_loop(scheduler, prediction):
    pipe = tiny_pipeline(prediction)
    seeds = [3, 7]
    ours = pipe.sample(seeds, steps=8, scheduler=scheduler)
    reference = DDPMPipeline(unet=DiffusersInterface(pipe.unet), scheduler=pipe.schedule.sampler(scheduler))
    reference.set_progress_bar_config(disable=True)
    outputs = []  # diffusers' loop ends in (x / 2 + 0.5).clamp(0, 1): record each step's x before that
    step = reference.scheduler.step
    reference.scheduler.step = lambda *args, **kwargs: outputs.append(step(*args, **kwargs)) or outputs[-1]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with torch.inference_mode():
        reference(batch_size=2, generator=generators, num_inference_steps=8, output_type="pt")
    assert len(outputs) == 8
    torch.testing.assert_close(ours, outputs[-1].prev_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("scheduler", "monai_scheduler", "prediction", "train_steps", "steps"),
    [
        ("ddpm", MonaiDDPM, "v", 100, 100),
        ("ddpm", MonaiDDPM, "x0", 100, 100),
        ("ddim", MonaiDDIM, "v", 1000, 10),
        ("ddim", MonaiDDIM, "x0", 1000, 10),
    ],
)
def test_sampling_equals_monai_diffusion_inferer(scheduler, monai_scheduler, prediction, train_steps, steps):
    """MONAI's DDPM steps one timestep at a time (its variance uses the single-step beta), so it runs the whole chain.

    MONAI takes each step's beta from the schedule, diffusers recomputes it as ``1 - abar_t / abar_(t-1)``;
    in float32 that loses about 6e-8 / beta (6e-4 relative at beta 1e-4), so the v-prediction chain agrees
    to 1e-3, the rest to 1e-5.
    """
    pipe = tiny_pipeline(prediction, train_steps)
    seed = 11
    ours = pipe.sample([seed], steps=steps, scheduler=scheduler)
    monai = monai_scheduler(num_train_timesteps=train_steps, schedule="linear_beta", clip_sample=False,
                            prediction_type=MONAI_PREDICTION[prediction])
    monai.set_timesteps(steps)
    sampler = pipe.schedule.sampler(scheduler)
    sampler.set_timesteps(steps)
    # MONAI's DDIM spaces timesteps by linspace, diffusers' by "leading": use ours
    monai.timesteps = sampler.timesteps.clone()
    torch.manual_seed(seed)  # MONAI's schedulers draw step noise from the global generator: continue its stream
    noise = torch.randn(1, 1, SIZE, SIZE)
    with torch.inference_mode():
        theirs = DiffusionInferer(monai).sample(noise, pipe.unet, scheduler=monai, verbose=False)
    tolerance = 1e-3 if (scheduler, prediction) == ("ddpm", "v") else 1e-5
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


class StubUNet(torch.nn.Module):
    """Predicts a constant image per item: the mean of its context (so cond and uncond differ)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels=None, context=None):
        return torch.zeros_like(x) + context.mean(dim=(1, 2)).view(-1, *[1] * (x.ndim - 1))


class StubTextEncoder:
    def context(self, reports):
        return torch.stack([torch.full((4, 8), float(len(r))) for r in reports])


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.5, 7.0])
def test_guidance_formula_with_a_stub_network(gamma):
    """x0-prediction and one DDIM step (final alpha 1) return the guided x0 itself: uncond + gamma (cond - uncond)."""
    config = tiny_pipeline("x0").config.model_copy(update={"text_encoder": TextEncoderConfig(spec="stub")})
    pipe = DiffusionPipeline(DiffusionModel(config, {"unet": StubUNet()}, text_encoder=StubTextEncoder()))
    out = pipe.sample([0, 1], steps=1, scheduler="ddim", prompts=["ab", "abcdef"], guidance_scale=gamma,
                      negative_prompt="a")
    cond, uncond = torch.tensor([2.0, 6.0]), torch.tensor([1.0, 1.0])
    expected = uncond + gamma * (cond - uncond)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), expected)
    assert torch.all(out == out.flatten(1)[:, :1, None, None])


def test_full_loop_value_is_pinned():
    """DDIM, 10 steps, v-prediction, seed 0 on the tiny seeded network
    (as diffusers' scheduler tests pin result sums)."""
    x = tiny_pipeline("v").sample([0], steps=10, scheduler="ddim")
    assert x.abs().sum().item() == pytest.approx(PINNED_ABS_SUM, rel=1e-4)
    assert x.mean().item() == pytest.approx(PINNED_MEAN, rel=1e-3, abs=1e-5)


PINNED_ABS_SUM = 158.5517
PINNED_MEAN = 0.0081327
