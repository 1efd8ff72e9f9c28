"""Train a 2D mask-conditioned inpainting model on the MNI152 T1 slices (``bench/mni_slices.py``).

The network sees [noisy slice, slice with a random region cut out, mask] (``RandInpaintMaskd``: blobs,
boxes and brush strokes of 1-30 % of the brain); left-right flips. Writes the EMA model folder to
``OUT/model`` and ``OUT/train.json`` (steps, time, last loss). Runs anywhere: ``--device cuda`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from meddiff.data.masks import CONDITION_KEY, RandInpaintMaskd
from meddiff.training import DiffusionModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=".gpu")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train-seconds", type=float, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    slices = torch.from_numpy(np.load(Path(args.data) / "slices.npy").astype(np.float32))
    window = json.loads((Path(args.data) / "intensity.json").read_text())
    masks = RandInpaintMaskd()
    masks.set_random_state(0)

    def collate(items):
        x = torch.stack([item[0] for item in items])
        flip = torch.rand(len(x)) < 0.5
        x[flip] = x[flip].flip(-2)
        conditions = [masks({"image": image})[CONDITION_KEY] for image in x]
        return {"image": x, CONDITION_KEY: torch.stack(conditions)}

    pl.seed_everything(0)
    module = DiffusionModule(
        spatial_dims=2, channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1,
        prediction="v", beta_schedule="cosine", lr=2e-4, ema_decay=0.995, image_shape=tuple(slices.shape[2:]),
        image_spacing=(2.0, 2.0), modality="MR", intensity_range=(window["low"], window["high"]),
        concat_channels=2, concat_key=CONDITION_KEY, task="inpaint",
    )
    loader = DataLoader(TensorDataset(slices), batch_size=args.batch_size, shuffle=True, drop_last=True,
                        collate_fn=collate)
    gpu = args.device.startswith("cuda")
    trainer = pl.Trainer(accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
                         max_time={"seconds": args.train_seconds}, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         gradient_clip_val=1.0)
    start = time.perf_counter()
    trainer.fit(module, loader)
    record = {"train_steps": trainer.global_step, "train_seconds": time.perf_counter() - start,
              "last_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
              "batch_size": args.batch_size}
    out = Path(args.out)
    module.diffusion_model(ema=True).save_pretrained(out / "model", overwrite=True)
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
