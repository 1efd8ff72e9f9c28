"""Benchmark (a): wall time of ``pipeline.sample`` against MONAI's ``DiffusionInferer.sample``.

Same network, same DDIM schedule, same number of steps and batch; runs alternate so both see the
same machine load; medians reported. ``--model`` is a pipeline folder (default: a freshly
initialised 4M-parameter 96x112 UNet, which times the same arithmetic as a trained one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from meddiff.pipelines import DiffusionPipeline
from meddiff.training import DiffusionModule

MONAI_SCHEDULES = {"linear": "linear_beta", "scaled_linear": "scaled_linear_beta", "cosine": "cosine"}
MONAI_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def time_against_monai(pipeline: DiffusionPipeline, device: str, batch: int, steps: int, repeats: int = 3) -> dict:
    """Median seconds of both samplers, alternating runs."""
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

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ours, theirs = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        pipeline.sample(range(batch), steps=steps, scheduler="ddim")
        sync()
        ours.append(time.perf_counter() - t0)
        noise = torch.randn(shape, device=device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            inferer.sample(input_noise=noise, diffusion_model=pipeline.unet, scheduler=monai_scheduler, verbose=False)
        sync()
        theirs.append(time.perf_counter() - t0)
    return {
        "batch": batch,
        "steps": steps,
        "meddiff_s": ours,
        "monai_s": theirs,
        "meddiff_median_s": statistics.median(ours),
        "monai_median_s": statistics.median(theirs),
        "ratio_median": statistics.median(ours) / statistics.median(theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="pipeline folder (default: a fresh benchmark-sized UNet)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.model:
        pipeline = DiffusionPipeline.from_pretrained(args.model, device=args.device)
    else:
        torch.manual_seed(0)
        module = DiffusionModule(channels=(32, 64, 128), attention_levels=(False, False, True), num_res_blocks=2,
                                 prediction="v", beta_schedule="cosine", image_shape=(96, 112))
        pipeline = module.pipeline(ema=False)
        pipeline.unet.to(args.device).eval()
    pipeline.sample(range(args.batch), steps=2)  # warm-up
    print(json.dumps(time_against_monai(pipeline, args.device, args.batch, args.steps, args.repeats), indent=2))


if __name__ == "__main__":
    main()
