"""Rectified flow against a DDPM-family model with DPM-Solver++: sample quality against the number of steps.

Trains the same UNet twice on the sampler benchmark's MNI slices (``python -m bench.mni_slices``; ``--downsample 2``
averages 2x2 pixels, 4 mm, so that CPU training converges in minutes), with the same
seed, batches and number of steps: once as a v-prediction DDPM (cosine betas) sampled with DPM-Solver++ 2M,
once as rectified flow (logit-normal timesteps) sampled with MONAI's ``RFlowScheduler`` (Euler). Then samples
both at each step count with the same seeds and scores them against the real slices with the sampler
benchmark's distances (``sampler_quality.swd`` and ``fd_pca``; lower is better).

    python -m bench.rflow_quality --data runs/mni --out runs/rflow_quality --downsample 2 --steps 3000
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
from bench.sampler_quality import fd_pca, swd
from bench.train_mni_gpu import flip_collate
from meddiff.training import DiffusionModule

MODELS = {  # name: (DiffusionModule schedule options, sampler)
    "ddpm-v": ({"schedule": "ddpm", "prediction": "v", "beta_schedule": "cosine"}, "dpm++2m"),
    "rflow": ({"schedule": "rflow", "prediction": "v", "timestep_sampling": "logit-normal"}, "rflow"),
}
STEP_COUNTS = (5, 10, 20, 30, 50)


def train(name: str, slices: torch.Tensor, window: dict, spacing: float, steps: int,
          batch_size: int) -> tuple[DiffusionModule, float]:
    pl.seed_everything(0)
    module = DiffusionModule.from_flat(
        spatial_dims=2, channels=(32, 64, 64), attention_levels=(False, False, False), num_res_blocks=1,
        num_head_channels=32, lr=2e-4, ema_decay=0.995, image_shape=tuple(slices.shape[2:]),
        image_spacing=(spacing, spacing), modality="MR", intensity_range=(window["low"], window["high"]),
        **MODELS[name][0],
    )
    loader = DataLoader(TensorDataset(slices), batch_size=batch_size, shuffle=True, drop_last=True,
                        collate_fn=flip_collate, generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0)
    with harness.stopwatch() as lap:
        trainer.fit(module, loader)
    return module, lap.seconds


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED,
                            out_help="the folder of the two models and the JSON record (rflow_quality.json)")
    parser.add_argument("--data", default="runs/mni")
    parser.add_argument("--steps", type=int, default=3000, help="training steps, the same for both models")
    parser.add_argument("--downsample", type=int, default=1, help="average this many pixels per side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-samples", type=int, default=128)
    return parser


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slices = torch.from_numpy(np.load(Path(args.data) / "slices.npy").astype(np.float32))
    slices = torch.nn.functional.avg_pool2d(slices, args.downsample)
    window = json.loads((Path(args.data) / "intensity.json").read_text())
    real = slices[:, 0].numpy()
    real = np.concatenate([real, real[:, ::-1]])  # trained with left-right flips
    rows = []
    for name, (_, sampler) in MODELS.items():
        module, train_seconds = train(name, slices, window, 2.0 * args.downsample, args.steps,
                                     args.batch_size)
        print(f"{name}: {args.steps} steps in {train_seconds:.0f} s", flush=True)
        pipeline = module.pipeline(ema=True)
        pipeline.save_pretrained(out / name, overwrite=True)
        for steps in STEP_COUNTS:
            with harness.stopwatch() as lap:
                fake = pipeline.sample(range(args.n_samples), steps=steps, scheduler=sampler)[:, 0].float().numpy()
            rows.append({"model": name, "sampler": sampler, "steps": steps, "swd": swd(real, fake),
                         "fd_pca": fd_pca(real, fake), "sample_seconds": lap.seconds, "train_seconds": train_seconds})
            print(json.dumps(rows[-1]), flush=True)
    summary = {"train_steps": args.steps, "downsample": args.downsample, "batch_size": args.batch_size,
               "n_samples": args.n_samples, "rows": rows}
    harness.write_result("rflow_quality", args, summary, out / "rflow_quality.json")
    print("| steps | DPM-Solver++ 2M SWD | rectified flow SWD | ratio | DPM-Solver++ 2M FD-PCA | "
          "rectified flow FD-PCA | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for steps in STEP_COUNTS:
        d, r = (next(x for x in rows if x["model"] == m and x["steps"] == steps) for m in MODELS)
        print(f"| {steps} | {d['swd']:.2f} | {r['swd']:.2f} | {r['swd'] / d['swd']:.2f} | {d['fd_pca']:.1f} | "
              f"{r['fd_pca']:.1f} | {r['fd_pca'] / d['fd_pca']:.2f} |")


if __name__ == "__main__":
    harness.main(run, options)
