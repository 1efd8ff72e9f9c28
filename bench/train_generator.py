"""Train the bundled unconditional MRI slice generator (``mri-t1-2d``) from the arrays of ``bench.inpaint_data``.

Whole slices at 2 mm (the 1 mm training slices of ``mri-inpaint`` and ``mri-denoise`` averaged 2x2 to 120x120:
nilearn's MNI152 T1 along its three axes, every second slice, and dipy's ``S0_10`` and ``aniso_vox``; never
``t1_coronal_slice``, never pydicom data), randomly mirrored left-right; v-prediction with the cosine schedule, so
RePaint (``meddiff inpaint --model mri-t1-2d``) can use it as well as ``meddiff generate``. Writes the EMA model
folder to ``OUT/model`` and ``OUT/train.json``.

    python -m bench.inpaint_data --modality MR --out runs/gen_data
    python -m bench.train_generator --data runs/gen_data/inpaint_mr.npz --out runs/mri_t1_2d --train-seconds 2100
    python -m bench.train_generator --data runs/gen_data/inpaint_mr.npz --out runs/mri_t1_2d_more \\
        --train-seconds 1800 --init runs/mri_t1_2d/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench import harness
from bench.train_inpaint import MR_RANGE, Progress, coarser
from meddiff.training import DiffusionModule


class Slices(Dataset):
    """Every slice, mirrored left-right at random (seeded per index and epoch by the loader's generator)."""

    def __init__(self, images: np.ndarray):
        self.images = torch.from_numpy(images.astype(np.float32))[:, None]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {"image": image.flip(-1) if torch.rand(()) < 0.5 else image}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED, out_help="the folder of the model and train.json (the "
                            "JSON record)", device="cpu", seed=0)
    parser.add_argument("--data", required=True, help="inpaint_mr.npz from python -m bench.inpaint_data --modality MR")
    parser.add_argument("--train-seconds", type=float, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--init", help="a model folder of this recipe to continue from (its EMA weights)")
    return parser


def run(args: argparse.Namespace) -> None:
    arrays = coarser(dict(np.load(args.data)), 2)
    pl.seed_everything(args.seed)
    module = DiffusionModule.from_flat(
        spatial_dims=2, channels=(32, 64, 64), attention_levels=(False, False, False), num_res_blocks=1,
        num_head_channels=32, prediction="v", beta_schedule="cosine", lr=3e-4, ema_decay=0.995,
        image_shape=arrays["images"].shape[1:], image_spacing=(2.0, 2.0), modality="MR", intensity_range=MR_RANGE)
    if args.init:
        from meddiff.model import load_model

        weights = {k: v.float() for k, v in load_model(args.init).unet.state_dict().items()}
        module.unet.load_state_dict(weights)
        module.ema.module.load_state_dict(weights)
    loader = DataLoader(Slices(arrays["images"]), batch_size=args.batch_size, shuffle=True, drop_last=True)
    accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_time={"seconds": args.train_seconds}, max_epochs=-1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0, callbacks=[Progress()])
    with harness.stopwatch() as lap:
        trainer.fit(module, loader)
    seconds = lap.seconds
    out = Path(args.out)
    module.pipeline(ema=True).save_pretrained(out / "model", overwrite=True)
    summary = {"steps": trainer.global_step, "seconds": round(seconds), "batch_size": args.batch_size,
               "slices": len(arrays["images"]), "shape": list(arrays["images"].shape[1:]),
               "last_loss": float(trainer.callback_metrics.get("train/loss", float("nan")))}
    harness.write_result("train_generator", args, summary, out / "train.json")
    print(json.dumps(summary))


if __name__ == "__main__":
    harness.main(run, options)
