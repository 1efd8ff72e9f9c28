"""Train a bundled 2D mask-conditioned inpainting model from the arrays of ``bench.inpaint_data``.

The network sees [noisy slice, slice with a random region cut out, mask] (``RandInpaintMaskd``: blobs, boxes,
brush strokes and, for CT, whole labelled structures, 1-30 % of the foreground) on random crops at a coarser
voxel size (``--crop``, ``--downsample``; MRI also flipped and turned by 90 degrees); the loss weighs the
region to fill 10x the rest and never sees a CT's padding outside the field of view. The recipe is that of
``configs/mri_inpaint_2d.yaml`` and ``configs/ct_inpaint_2d.yaml``. Writes the EMA model folder to
``OUT/model`` and ``OUT/train.json`` (steps, time, last loss). Runs anywhere: ``--device cuda`` on a GPU.

    python -m bench.inpaint_data --modality MR --out .gpu
    python -m bench.train_inpaint --data .gpu/inpaint_mr.npz --out runs/mri_inpaint --train-seconds 2100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench import harness
from bench.inpaint_data import CT_WINDOW
from meddiff.data.masks import CONDITION_KEY, SHAPES, RandInpaintMaskd
from meddiff.training import DiffusionModule

MR_RANGE = (0.0, 1.0)  # the MR slices are normalised per volume, as mri-denoise's are


class Crops(Dataset):
    """Random crops centred near a foreground voxel, with a random inpainting mask each."""

    def __init__(self, arrays: dict[str, np.ndarray], crop: int, seed: int):
        self.arrays, self.ct, self.crop = arrays, "labels" in arrays, crop
        self.masks = RandInpaintMaskd(shapes=SHAPES if self.ct else SHAPES[:3], foreground_key="foreground",
                                      labels_key="labels" if self.ct else None)
        self.masks.set_random_state(seed)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return 10**9  # endless: training stops on time

    def __getitem__(self, _):
        index = self.rng.integers(len(self.arrays["images"]))
        body = self.arrays["foreground"][index]
        centre = np.argwhere(body)[self.rng.integers(body.sum())]
        crop = self.crop
        start = [int(np.clip(c - crop // 2, 0, n - crop)) for c, n in zip(centre, body.shape, strict=True)]
        window = (slice(start[0], start[0] + crop), slice(start[1], start[1] + crop))
        item = {key: np.asarray(value[index][window])[None] for key, value in self.arrays.items()}
        if not self.ct:  # brains have no up, down, left or right at this scale
            turns, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            item = {k: np.rot90(v[..., ::-1] if flip else v, turns, axes=(1, 2)).copy() for k, v in item.items()}
        item = {"image": torch.from_numpy(item["images"].astype(np.float32)),
                **{k: torch.from_numpy(v.astype(np.float32)) for k, v in item.items() if k != "images"}}
        if not item["foreground"].any():
            item["foreground"] = torch.ones_like(item["foreground"])
        out = self.masks(item)
        return {k: out[k] for k in ("image", CONDITION_KEY, "valid") if k in out}


class Progress(pl.Callback):
    """A line every 200 steps (the log of a background run)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % 200 == 0:
            loss = float(outputs["loss"])
            print(f"step {trainer.global_step} loss {loss:.4f} {time.strftime('%H:%M:%S')}", flush=True)


def coarser(arrays: dict[str, np.ndarray], factor: int) -> dict[str, np.ndarray]:
    """The slices at ``factor`` times the voxel size: images averaged over factor x factor blocks (a block
    is valid only where all its voxels are), masks by their majority, labels by every ``factor``-th voxel."""
    if factor == 1:
        return arrays

    def blocks(a):
        n, h, w = a.shape
        return a[:, : h - h % factor, : w - w % factor].reshape(n, h // factor, factor, w // factor, factor)

    out = {"images": blocks(arrays["images"].astype(np.float32)).mean(axis=(2, 4)).astype(np.float16),
           "foreground": blocks(arrays["foreground"]).mean(axis=(2, 4)) >= 0.5}
    if "labels" in arrays:
        out["labels"] = arrays["labels"][:, ::factor, ::factor]
        out["valid"] = blocks(arrays["valid"]).all(axis=(2, 4))
        out["images"] = np.where(out["valid"], out["images"], arrays["images"].min()).astype(np.float16)
    return out


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED, out_help="the folder of the model and train.json (the "
                            "JSON record)", device="cpu", seed=0)
    parser.add_argument("--data", required=True, help="inpaint_mr.npz or inpaint_ct.npz")
    parser.add_argument("--train-seconds", type=float, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--crop", type=int, default=64, help="training crop, in voxels of the model's size")
    parser.add_argument("--downsample", type=int, default=2, help="the model's voxel size over the arrays'")
    return parser


def run(args: argparse.Namespace) -> None:
    arrays = coarser(dict(np.load(args.data)), args.downsample)
    ct = "labels" in arrays
    spacing = tuple(args.downsample * s for s in ((1.4, 1.4) if ct else (1.0, 1.0)))
    pl.seed_everything(args.seed)
    torch.set_flush_denormal(True)  # tiny activations late in training are subnormal floats, slow on CPUs
    module = DiffusionModule.from_flat(
        spatial_dims=2, channels=(16, 32, 64, 64), attention_levels=(False,) * 4, num_res_blocks=1,
        norm_num_groups=8, num_head_channels=16,
        prediction="v", beta_schedule="cosine", lr=3e-4, ema_decay=0.995, image_shape=(args.crop, args.crop),
        image_spacing=spacing, modality="CT" if ct else "MR",
        intensity_range=CT_WINDOW if ct else MR_RANGE, concat_channels=2, concat_key=CONDITION_KEY, task="inpaint",
        outside_mask_weight=0.1, valid_key="valid" if ct else None,
    )
    loader = DataLoader(Crops(arrays, args.crop, seed=args.seed), batch_size=args.batch_size, num_workers=args.workers,
                        worker_init_fn=lambda worker: torch.utils.data.get_worker_info().dataset.masks.set_random_state(
                            args.seed + worker + 1))
    gpu = args.device.startswith("cuda")
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                         max_time={"seconds": args.train_seconds}, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0, callbacks=[Progress()])
    with harness.stopwatch() as lap:
        trainer.fit(module, loader)
    record = {"data": Path(args.data).name, "train_steps": trainer.global_step,
              "train_seconds": round(lap.seconds, 1),
              "last_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "batch_size": args.batch_size, "crop": args.crop, "spacing_mm": spacing, "device": args.device}
    out = Path(args.out)
    module.diffusion_model(ema=True).save_pretrained(out / "model", overwrite=True)
    harness.write_result("train_inpaint", args, record, out / "train.json")
    print(json.dumps(record))


if __name__ == "__main__":
    harness.main(run, options)
