"""Benchmark (c): step time of ``DiffusionModule`` under a Lightning Trainer against a bare loop.

The bare loop does the same work with MONAI and torch alone: MONAI UNet, MONAI DDPM scheduler
``add_noise``, MSE on eps, AdamW, gradient clipping and the same EMA update, on the same batches.
Blocks of steps alternate between the two so both see the same machine load; per-step medians.

    python -m bench.training_overhead --batch 8 --steps 15 --blocks 3
"""

from __future__ import annotations

import argparse
import json
import statistics

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader

from bench import harness
from meddiff.nets import build_unet
from meddiff.training import DiffusionModule
from meddiff.training.module import ema_with_warmup

UNET = dict(channels=(32, 64, 128), attention_levels=(False, False, True), num_res_blocks=2, num_head_channels=32)


class StepTimer(pl.Callback):
    """Times each training step, from the start of its batch to its end, with the harness's stopwatch."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.watch = harness.stopwatch(self.times)
        self.watch.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.watch.__exit__(None, None, None)


def lightning_steps(batches: list[dict], steps: int) -> list[float]:
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(**UNET, image_shape=tuple(batches[0]["image"].shape[2:]), lr=1e-4)
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer], num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return timer.times


def bare_steps(batches: list[dict], steps: int) -> list[float]:
    torch.manual_seed(0)
    unet = build_unet(**UNET)
    ema = AveragedModel(unet, multi_avg_fn=ema_with_warmup(0.999), use_buffers=True)
    ema.requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    times = []
    for i in range(steps):
        x0 = batches[i % len(batches)]["image"]
        with harness.stopwatch(times):
            noise = torch.randn_like(x0)
            t = torch.randint(0, 1000, (x0.shape[0],))
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), timesteps=t), noise)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            ema.update_parameters(unet)
    return times


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("training_overhead"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=2, default=(96, 112))
    parser.add_argument("--steps", type=int, default=15, help="steps per block (the first 3 of each block are warm-up)")
    parser.add_argument("--blocks", type=int, default=3)
    return parser


def run(args: argparse.Namespace) -> None:
    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(args.batch, 1, *args.shape, generator=generator)} for _ in range(4)]
    ours, bare = [], []
    for _ in range(args.blocks):
        ours += lightning_steps(batches, args.steps)[3:]
        bare += bare_steps(batches, args.steps)[3:]
    result = {
        "batch": args.batch,
        "shape": list(args.shape),
        "lightning_median_s": statistics.median(ours),
        "bare_median_s": statistics.median(bare),
        "overhead": statistics.median(ours) / statistics.median(bare) - 1.0,
        "steps_each": len(ours),
    }
    print(json.dumps(result, indent=2))
    harness.write_result("training_overhead", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
