"""Train the MNI152 slice model used by the sampler benchmarks, then sample with each sampler.

Runs anywhere (``--device cuda`` is what the numbers in BENCHMARKS.md used). Writes the EMA model
(``model/``), one ``samples_<sampler>_<steps>.npz`` per sampler ('+' written 'p') (float16, N x 96 x 112, in [-1, 1])
and ``timings.json`` (training steps, sampling wall time per sampler, and ``pipeline.generate``
against MONAI's ``DiffusionInferer.sample`` with the same network, DDIM and 50 steps; the JSON record).

    python -m bench.mni_slices --out .gpu
    python -m bench.train_mni_gpu --out OUT --train-seconds 130 --batch-size 96 --n-samples 128
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from bench import harness
from bench.sampling_speed import time_against_monai
from meddiff.training import DiffusionModule

SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("dpm++2m", 20), ("dpm++2m", 10), ("unipc", 10)]


def flip_collate(items):
    """Random left-right flips (the brain is nearly symmetric): a little more data from 123 slices."""
    x = torch.stack([i[0] for i in items]).float()
    flip = torch.rand(len(x)) < 0.5
    x[flip] = x[flip].flip(-2)
    return {"image": x}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED, out_help="the folder of the model, the samples and "
                            "timings.json (the JSON record)", device="cuda", seed=0)
    parser.add_argument("--data", default=".gpu")
    parser.add_argument("--train-seconds", type=float, default=270)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--sample-batch", type=int, default=128)
    parser.add_argument("--prediction", default="v")
    parser.add_argument("--beta-schedule", default="cosine")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--quick", action="store_true", help="few steps per sampler (a smoke run of this script)")
    return parser


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    slices = torch.from_numpy(np.load(Path(args.data) / "slices.npy").astype(np.float32))
    window = json.loads((Path(args.data) / "intensity.json").read_text())
    pl.seed_everything(args.seed)
    module = DiffusionModule.from_flat(
        spatial_dims=2, channels=(32, 64, 128), attention_levels=(False, False, True), num_res_blocks=2,
        num_head_channels=32, prediction=args.prediction, beta_schedule=args.beta_schedule, lr=2e-4,
        ema_decay=args.ema_decay, image_shape=tuple(slices.shape[2:]), image_spacing=(2.0, 2.0), modality="MR",
        intensity_range=(window["low"], window["high"]),
    )
    loader = DataLoader(TensorDataset(slices), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=flip_collate)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision="bf16-mixed" if accelerator == "gpu" else "32-true",
        max_time={"seconds": args.train_seconds}, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
    )
    with harness.stopwatch() as lap:
        trainer.fit(module, loader)
    train_seconds = lap.seconds
    print(f"trained {trainer.global_step} steps in {train_seconds:.0f} s, "
          f"last loss {float(trainer.callback_metrics.get('train/loss', float('nan'))):.4f}", flush=True)
    pipeline = module.pipeline(ema=True)
    pipeline.unet.to(args.device).eval()
    pipeline.save_pretrained(out / "model", overwrite=True)
    timings = {"train_steps": trainer.global_step, "train_seconds": train_seconds,
               "device": torch.cuda.get_device_name() if accelerator == "gpu" else "cpu", "sampling": {}}
    for name, steps in SAMPLERS:
        steps = 2 if args.quick else steps
        chunks = []
        with harness.stopwatch(sync=harness.device_sync(args.device)) as lap:
            for first in range(0, args.n_samples, args.sample_batch):
                seeds = range(first, min(args.n_samples, first + args.sample_batch))
                chunks.append(pipeline.sample(seeds, steps=steps, scheduler=name).float().cpu())
        seconds = lap.seconds
        samples = torch.cat(chunks)[:, 0].numpy().astype(np.float16)
        np.savez_compressed(out / f"samples_{name.replace('+', 'p')}_{steps}.npz", samples=samples)
        timings["sampling"][f"{name}-{steps}"] = seconds
        print(f"{name}-{steps}: {len(samples)} samples in {seconds:.1f} s", flush=True)
    timings["generate_vs_inferer"] = time_against_monai(pipeline, args.device, batch=32, steps=5 if args.quick else 50)
    harness.write_result("train_mni_gpu", args, timings, out / "timings.json")
    print(json.dumps(timings["generate_vs_inferer"]))


if __name__ == "__main__":
    harness.main(run, options)
