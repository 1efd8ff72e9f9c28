"""Benchmark (a): wall time of meddiff's sampling loop against MONAI's ``DiffusionInferer.sample`` and against
the raw network evaluations alone.

Same network, same DDIM schedule, same number of steps and batch. "raw" calls the UNet once per step on
the same input with nothing else (no scheduler, no conditioning, no loop bookkeeping): the floor any
loop pays. Runs alternate so all three see the same machine load; medians reported. The loop's own work
is also timed alone, around a network that costs one multiply (``loop_overhead_ms_per_step``). ``--model`` is a
model folder (default: a freshly initialised 4M-parameter 96x112 UNet, which times the same arithmetic
as a trained one).

    python -m bench.sampling_speed --batch 1 --steps 10 --repeats 15
"""

from __future__ import annotations

import argparse
import json

import torch

from bench import harness
from meddiff.pipelines import DiffusionPipeline
from meddiff.training import DiffusionModule

MONAI_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}
MONAI_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def time_against_monai(pipeline: DiffusionPipeline, device: str, batch: int, steps: int, repeats: int = 3) -> dict:
    """Median seconds of meddiff's loop, MONAI's and the raw network evaluations, alternating runs."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDIMScheduler

    schedule = pipeline.schedule
    monai_scheduler = DDIMScheduler(
        num_train_timesteps=schedule.num_train_timesteps,
        schedule=MONAI_SCHEDULES[schedule.beta_schedule],
        prediction_type=MONAI_PREDICTIONS[schedule.prediction],
        clip_sample=False,
    )
    monai_scheduler.set_timesteps(steps)
    inferer = DiffusionInferer(monai_scheduler)
    shape = (batch, 1, *pipeline.config.image.shape)
    timesteps = [torch.full((batch,), int(t), device=device) for t in monai_scheduler.timesteps]

    sync = harness.device_sync(device)
    times = {"meddiff": [], "monai": [], "raw": []}
    for _ in range(repeats):
        with harness.stopwatch(times["meddiff"], sync):
            pipeline.sample(range(batch), steps=steps, scheduler="ddim")
        noise = torch.randn(shape, device=device)
        with harness.stopwatch(times["monai"], sync), torch.inference_mode():
            inferer.sample(input_noise=noise, diffusion_model=pipeline.unet, scheduler=monai_scheduler, verbose=False)
        with harness.stopwatch(times["raw"], sync), torch.inference_mode():
            for t in timesteps:
                pipeline.unet(noise, timesteps=t)
    medians = {name: harness.summary(values)["median"] for name, values in times.items()}
    return {
        "batch": batch,
        "steps": steps,
        **{f"{name}_s": values for name, values in times.items()},
        **{f"{name}_median_s": value for name, value in medians.items()},
        "ratio_median": medians["meddiff"] / medians["monai"],
        "ratio_to_raw_median": medians["meddiff"] / medians["raw"],
    }


class FreeNetwork(torch.nn.Module):
    """Costs one multiply: what remains of a sampling call is the loop's own work."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps=None, class_labels=None, context=None):
        return x * 0.5


def loop_overhead_ms_per_step(pipeline: DiffusionPipeline, batch: int, steps: int, repeats: int = 20) -> float:
    """Milliseconds per step of a whole ``sample`` call (checks, sampler, noise, loop) around a free network."""
    network = pipeline.unet
    pipeline.unet = FreeNetwork().to(network.device if hasattr(network, "device") else "cpu")
    try:
        pipeline.sample(range(batch), steps=steps)
        with harness.stopwatch() as lap:
            for _ in range(repeats):
                pipeline.sample(range(batch), steps=steps)
        return lap.seconds / repeats / steps * 1000
    finally:
        pipeline.unet = network


def benchmark_pipeline(device: str) -> DiffusionPipeline:
    """The benchmark-sized UNet (4M parameters, 96x112), freshly initialised."""
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(
        channels=(32, 64, 128), attention_levels=(False, False, True), num_res_blocks=2,
        prediction="v", beta_schedule="cosine", image_shape=(96, 112), image_spacing=(2.0, 2.0))
    pipeline = module.pipeline(ema=False)
    pipeline.unet.to(device).eval()
    return pipeline


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("sampling_speed"), device="cpu", repeats=5)
    parser.add_argument("--model", help="model folder (default: a fresh benchmark-sized UNet)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.model:
        pipeline = DiffusionPipeline.from_pretrained(args.model, args.device)
    else:
        pipeline = benchmark_pipeline(args.device)
    pipeline.sample(range(args.batch), steps=2)  # warm-up
    result = time_against_monai(pipeline, args.device, args.batch, args.steps, args.repeats)
    result["loop_overhead_ms_per_step"] = loop_overhead_ms_per_step(pipeline, args.batch, args.steps)
    result["network_ms_per_step"] = result["raw_median_s"] / args.steps * 1000
    print(json.dumps(result, indent=2))
    harness.write_result("sampling_speed", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
