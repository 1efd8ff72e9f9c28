"""The sampling loop against the references of the field, on the same network and the same noise.

As diffusers tests its schedulers: meddiff's DDPM, DDIM and DPM-Solver++ sampling equals diffusers'
own unconditional pipeline loop and MONAI's ``DiffusionInferer.sample`` (DDPM, DDIM); Euler, UniPC and PNDM
equal diffusers' documented denoising loop (``init_noise_sigma``, ``scale_model_input``, ``step``); RePaint
inpainting equals diffusers' ``RePaintPipeline``; the guidance formula is checked with a stub network, and a
full-loop value of each sampler and of RePaint is pinned.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
    RePaintPipeline,
    RePaintScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_ddpm, scheduling_repaint
from monai.inferers import DiffusionInferer
from monai.networks.schedulers import DDIMScheduler as MonaiDDIM
from monai.networks.schedulers import DDPMScheduler as MonaiDDPM

from meddiff import Image
from meddiff.diffusion import repaint
from meddiff.model import DiffusionModel, TextEncoderConfig
from meddiff.pipelines import DiffusionPipeline, generate
from meddiff.pipelines.spec import SamplingSpec
from meddiff.training import DiffusionModule

SIZE = 16
TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)
MONAI_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def tiny_pipeline(prediction: str = "eps", num_train_timesteps: int = 1000, **kwargs) -> DiffusionPipeline:
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(
        image_shape=(SIZE, SIZE), prediction=prediction, num_train_timesteps=num_train_timesteps,
        **TINY, **kwargs)
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
    reference = DDPMPipeline(unet=DiffusersInterface(pipe.unet), scheduler=pipe.schedule.scheduler(scheduler))
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
    sampler = pipe.schedule.scheduler(scheduler)
    sampler.set_timesteps(steps)
    # MONAI's DDIM spaces timesteps by linspace, diffusers' by "leading": use ours
    monai.timesteps = sampler.timesteps.clone()
    torch.manual_seed(seed)  # MONAI's schedulers draw step noise from the global generator: continue its stream
    noise = torch.randn(1, 1, SIZE, SIZE)
    with torch.inference_mode():
        theirs = DiffusionInferer(monai).sample(noise, pipe.unet, scheduler=monai, verbose=False)
    tolerance = 1e-3 if (scheduler, prediction) == ("ddpm", "v") else 1e-5
    torch.testing.assert_close(ours, theirs, atol=tolerance, rtol=tolerance)


# diffusers' schedulers as diffusers configures them (defaults: 1000 timesteps, linear betas 1e-4 .. 0.02), built
# here rather than by meddiff's table so that the table's translation is tested too
DIFFUSERS_SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # PLMS alone, as Stable Diffusion configures it
}


def diffusers_loop(unet: torch.nn.Module, scheduler, noise: torch.Tensor, generator, steps: int) -> torch.Tensor:
    """diffusers' documented denoising loop ("Understanding pipelines, models and schedulers"): start from
    ``noise * init_noise_sigma``, then ``scale_model_input``, the model, ``step(...).prev_sample``; the generator
    goes to a ``step`` that takes one, as diffusers' pipelines decide it (``prepare_extra_step_kwargs``)."""
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(model_output, t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize(
    ("scheduler", "prediction"),
    [("euler", "eps"), ("euler", "v"), ("euler", "x0"), ("unipc", "eps"), ("unipc", "v"), ("unipc", "x0"),
     ("pndm", "eps"), ("pndm", "v")],  # PNDM takes no x0-prediction model (refused, test_pipeline)
)
def test_sampling_equals_the_diffusers_documented_loop(scheduler, prediction):
    """``generate.sample`` with Euler, UniPC and PNDM equals diffusers' own loop on the same network and x_T
    (``generate.initial_noise``). Euler is the sampler of meddiff's table whose x_T is not the unit noise
    (``init_noise_sigma`` = sigma_max, about 157) and whose network input is scaled at every step
    (``scale_model_input``: x / sqrt(sigma^2 + 1)): a loop that forgot either fails here."""
    pipe = tiny_pipeline(prediction)
    seeds, steps = [3, 7], 8
    ours = generate.sample(pipe.model, SamplingSpec(scheduler=scheduler, steps=steps), seeds)
    cls, extra = DIFFUSERS_SCHEDULERS[scheduler]
    reference = cls(prediction_type=MONAI_PREDICTION[prediction], **extra)
    noise, generators = generate.initial_noise(pipe.model, seeds, (SIZE, SIZE))
    with torch.inference_mode():
        theirs = diffusers_loop(DiffusersInterface(pipe.unet), reference, noise, generators, steps)
    if scheduler == "euler":
        assert reference.init_noise_sigma > 100
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


class LevelTrueRePaintScheduler(RePaintScheduler):
    """diffusers' ``RePaintScheduler`` whose jumps start from the level the sample is at.

    After the step at ``t`` (r = T // steps training timesteps per step) the sample is at level ``t - r`` (clean
    after t = 0); diffusers' ``undo_step(sample, t)`` noises it with ``betas[t .. t + r - 1]``, so each jump ends
    r - 1 training timesteps noisier than the step it returns to expects (exact for r = 1). This one noises with
    ``betas[t - r + 1 .. t]``, one draw each, as diffusers does."""

    def undo_betas(self, timestep: int) -> torch.Tensor:
        r = self.config.num_train_timesteps // self.num_inference_steps
        return self.betas[max(0, timestep - r + 1):timestep + 1]

    def undo_step(self, sample: torch.Tensor, timestep: int, generator=None) -> torch.Tensor:
        for beta in self.undo_betas(timestep):
            noise = scheduling_repaint.randn_tensor(sample.shape, generator=generator, device=sample.device,
                                                    dtype=sample.dtype)
            sample = (1 - beta) ** 0.5 * sample + beta**0.5 * noise
        return sample


def meddiff_draws(events: list[tuple[str, int, list[torch.Tensor]]], undo_betas, copies: int) -> list[torch.Tensor]:
    """The noise meddiff's RePaint draws, in meddiff's order, made of the noise diffusers' RePaint drew.

    ``events``: ``(kind, t, draws)`` of each ``step`` and ``undo_step`` diffusers ran; ``undo_betas(t)``: the betas
    ``undo_step(sample, t)`` noised with, one draw each. diffusers' one draw of a step serves both regions: meddiff
    draws it ``copies`` times (DDPM's step noise for the region to fill, then the known region's), and draws
    nothing at t = 0 (the clean level). The undo steps of a jump are one draw in meddiff: diffusers' draws summed
    as its undo steps sum them (``e = sqrt(1 - beta) e + sqrt(beta) u``), over their standard deviation
    ``sqrt(1 - prod(1 - beta))``.
    """
    queue, jump = [], None
    for kind, t, draws in events:
        if kind == "undo":
            for beta, u in zip(undo_betas(t), draws, strict=True):
                e, kept = jump or (torch.zeros_like(u), 1.0)
                jump = ((1 - beta) ** 0.5 * e + beta**0.5 * u, kept * (1 - beta))
            continue
        if jump is not None:
            queue.append(jump[0] / (1 - jump[1]) ** 0.5)
            jump = None
        if t > 0:
            queue.extend(draws * copies)
    return queue


@pytest.mark.parametrize(
    ("scheduler", "eta", "train_steps", "tolerance"),
    [("ddpm", 1.0, 30, 1e-3), ("ddim", 0.0, 30, 1e-5), ("ddpm", 1.0, 120, 1e-3), ("ddim", 0.0, 120, 1e-5)],
)
def test_repaint_equals_the_diffusers_repaint_pipeline(monkeypatch, scheduler, eta, train_steps, tolerance):
    """RePaint through ``pipeline.inpaint`` (DDPM, as in the paper: diffusers' eta 1; DDIM: eta 0) equals diffusers'
    ``RePaintPipeline`` on the same network, image, mask (diffusers' 1 = keep; meddiff's mask 1 = fill) and
    generator: the whole result, the filled region and the kept one.

    Both start from the same x_T (the same generator) and run the same plan of steps and jumps. Their noise is the
    same noise drawn differently, so diffusers' draws are recorded and given to meddiff in meddiff's order
    (``meddiff_draws``):

    - diffusers draws one noise per step for both the region to fill (the step's variance) and the known region
      (the image noised to the step's level); meddiff draws the two separately. The regions do not overlap: the
      one draw given twice is the same noise.
    - diffusers undoes a jump one training timestep at a time, one draw each; meddiff noises from the level the
      sample is at to the level the next step starts from in one draw: the sum of diffusers' draws, normalised.
    - with fewer inference steps than training timesteps (r = T // steps > 1) diffusers' ``undo_step`` noises
      from the wrong level (``LevelTrueRePaintScheduler``): with 30 steps of 120 timesteps (r = 4) the results
      differ by 0.1 (DDIM); with its jumps starting from the sample's level, by 2e-6. So the test runs diffusers' own
      scheduler at one step per training timestep (r = 1, where its jumps are exact) and the corrected one at r = 4.

    DDIM agrees to about 2e-6. diffusers writes the DDPM step in DDIM's form with eta 1,
    ``sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``: the DDPM posterior of
    ``DDPMScheduler.step`` algebraically (one step agrees to 3e-13 in float64), but in float32
    ``1 - abar_prev - sigma^2`` cancels near t = 0 (1.5e-4 on one step of values about 3), and the DDPM chain
    agrees to about 2e-4 on values up to 8: tolerance 1e-3.
    """
    steps, jump, resample, seed = 30, 5, 2, 5
    pipe = tiny_pipeline("eps", train_steps, modality="CT")  # CT's fixed window (-1, 1): its units are model units
    known = torch.linspace(-0.8, 0.9, SIZE * SIZE).reshape(1, 1, SIZE, SIZE) ** 3
    fill = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    fill[4:12, 3:10] = True

    r = train_steps // steps
    sampler = (RePaintScheduler if r == 1 else LevelTrueRePaintScheduler)(num_train_timesteps=train_steps,
                                                                           clip_sample=False)

    def undo_betas(t: int) -> torch.Tensor:
        if isinstance(sampler, LevelTrueRePaintScheduler):
            return sampler.undo_betas(t)
        return sampler.betas[t:t + r]  # diffusers' own undo_step
    reference = RePaintPipeline(unet=DiffusersInterface(pipe.unet), scheduler=sampler)
    reference.set_progress_bar_config(disable=True)
    draws, events, last = [], [], []
    draw = scheduling_repaint.randn_tensor
    monkeypatch.setattr(scheduling_repaint, "randn_tensor", lambda *a, **k: draws.append(draw(*a, **k)) or draws[-1])

    def recorded(kind, method):
        def run(*args, **kwargs):
            first = len(draws)
            out = method(*args, **kwargs)
            events.append((kind, int(args[1]), draws[first:]))
            if kind == "step":
                last[:] = [out.prev_sample]
            return out
        return run

    sampler.step, sampler.undo_step = recorded("step", sampler.step), recorded("undo", sampler.undo_step)
    with torch.inference_mode():  # its output is clamped to [0, 1] for display: the result is the last step's
        reference(known, (~fill).float()[None, None], num_inference_steps=steps, eta=eta, jump_length=jump,
                  jump_n_sample=resample, generator=[torch.Generator().manual_seed(seed)], output_type="np")
    theirs = last[0][0, 0]

    queue = meddiff_draws(events, undo_betas, copies=2 if scheduler == "ddpm" else 1)

    def replay(shape, generator=None, device=None, dtype=None, layout=None):
        noise = queue.pop(0)
        assert tuple(noise.shape) == tuple(shape)
        return noise

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", replay)
    monkeypatch.setattr(repaint, "randn_tensor", replay)
    image = Image(known[0, 0].numpy(), np.eye(4), "CT")
    ours = pipe.inpaint(image, fill.numpy(), seed=seed, steps=steps, jump=jump, resample=resample,
                        scheduler=scheduler, progress=False)[0]
    assert not queue  # meddiff drew as many noises as diffusers' draws make
    ran = [kind for kind, _, _ in events if kind == "step"]
    assert len(ran) == len(repaint.RePaint.plan_for(steps, jump, resample)) > steps  # the jumps ran steps again
    torch.testing.assert_close(torch.from_numpy(ours.array), theirs, atol=tolerance, rtol=tolerance)


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


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "unipc", "pndm"])
def test_full_loop_value_is_pinned(scheduler):
    """10 steps, v-prediction, seed 0 on the tiny seeded network (as diffusers' scheduler tests pin result sums)."""
    x = tiny_pipeline("v").sample([0], steps=10, scheduler=scheduler)
    abs_sum, mean = PINNED[scheduler]
    assert x.abs().sum().item() == pytest.approx(abs_sum, rel=1e-4)
    assert x.mean().item() == pytest.approx(mean, rel=1e-3, abs=1e-5)


PINNED = {  # abs sum and mean of the sample
    "ddim": (158.5517, 0.0081327),
    "euler": (155.2896, 0.0077535),
    "unipc": (183.3573, 0.0106682),
    "pndm": (158.5575, 0.0082271),
}


def test_repaint_full_loop_value_is_pinned():
    """RePaint (DDPM, 20 steps, jump 5, resample 2, seed 0) on the tiny seeded v-prediction network: the filled
    region's abs sum and mean, meddiff's own noise draws included (the reference test replays diffusers')."""
    pipe = tiny_pipeline("v", modality="CT")
    known = torch.linspace(-0.8, 0.9, SIZE * SIZE).reshape(SIZE, SIZE) ** 3
    fill = np.zeros((SIZE, SIZE), bool)
    fill[4:12, 3:10] = True
    out = pipe.inpaint(Image(known.numpy(), np.eye(4), "CT"), fill, seed=0, steps=20, jump=5, resample=2,
                       progress=False)[0].array
    assert np.array_equal(out[~fill], known.numpy()[~fill])
    assert float(np.abs(out[fill]).sum()) == pytest.approx(39.01316, rel=1e-4)
    assert float(out[fill].mean()) == pytest.approx(-0.0100742, rel=1e-3, abs=1e-5)
