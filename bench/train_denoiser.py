"""Train the bundled ``mri-denoise`` model from ``configs/mri_denoise_2d.yaml`` on prepared arrays.

The model, optimiser, noise range and augmentation come from the config (the same recipe
``meddiff fit --config configs/mri_denoise_2d.yaml`` runs on the manifest); only the data loading
differs: slices and the dead-leaves pool come from ``python -m bench.denoise_data``'s arrays, so a GPU
machine without MRI packages can run it. ``--dead-leaves P`` (the ablation) replaces a fraction P of
the patches by crops of the dead-leaves pool (what ``RandDeadLeavesd`` does online). Writes the EMA
model to ``--out`` and ``train_log.json`` beside it.

    python -m bench.denoise_data --out .gpu
    python -m bench.train_denoiser --data .gpu --out runs/denoiser/model --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from monai.data import DataLoader
from safetensors.torch import load_file
from torch.utils.data import Dataset

from bench import harness
from meddiff.training import DiffusionModule


def instantiate(spec: dict):
    module, _, name = spec["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


class PatchDataset(Dataset):
    """Random crops of MRI slices (or, with ``leaves_prob``, of dead-leaves images), then the augmentations."""

    def __init__(self, planes, leaves, size, leaves_prob, augment, length=1_000_000):
        self.planes, self.leaves, self.size = planes, leaves, size
        self.leaves_prob, self.augment, self.length = leaves_prob, augment, length

    def __len__(self) -> int:
        return self.length

    def crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pad = [(max(0, s - d) // 2, max(0, s - d) - max(0, s - d) // 2)
               for s, d in zip(self.size, image.shape, strict=True)]
        image = np.pad(image, pad, constant_values=-1.0)
        corner = [rng.integers(0, d - s + 1) for s, d in zip(self.size, image.shape, strict=True)]
        return image[corner[0] : corner[0] + self.size[0], corner[1] : corner[1] + self.size[1]]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(torch.randint(0, 2**62, ()).item())
        if rng.random() < self.leaves_prob:
            patch = self.crop(self.leaves[rng.integers(len(self.leaves))].astype(np.float32) / 127.5 - 1.0, rng)
        else:
            for _ in range(10):  # prefer crops with some anatomy in them
                patch = self.crop(self.planes[rng.integers(len(self.planes))].astype(np.float32), rng)
                if (patch > -0.8).mean() > 0.25:
                    break
        data = {"image": torch.from_numpy(np.ascontiguousarray(patch))[None]}
        for transform in self.augment:
            data = transform(data)
        return {"image": torch.as_tensor(data["image"]).float()}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED,
                            out_help="the model folder (with train_log.json, the JSON record)", device="cuda")
    parser.add_argument("--config", default="configs/mri_denoise_2d.yaml")
    parser.add_argument("--data", default=".gpu")
    parser.add_argument("--train-seconds", type=float, default=360)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the config's slices per step")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--init", help="start from this model folder's weights (continue a run)")
    parser.add_argument("--dead-leaves", type=float, default=0.0, help="ablation: fraction of dead-leaves patches")
    return parser


def run(args: argparse.Namespace) -> None:
    config = yaml.safe_load(Path(args.config).read_text())
    data_args = config["data"]["init_args"]
    augment, leaves_prob = [instantiate(spec) for spec in data_args.get("augment", [])], args.dead_leaves
    with np.load(Path(args.data) / "denoise_slices.npz") as npz:
        planes = [npz[k] for k in npz.files]
    leaves = np.load(Path(args.data) / "dead_leaves.npy")
    dataset = PatchDataset(planes, leaves, tuple(data_args["patch_size"]), leaves_prob, augment)
    batch_size = args.batch_size or data_args["batch_size"] * data_args["slices_per_volume"]
    # MONAI's DataLoader reseeds the random transforms in each worker (torch's would repeat their draws)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=args.workers, persistent_workers=args.workers > 0)
    pl.seed_everything(config.get("seed_everything", 0))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    module = DiffusionModule(**config["model"]["init_args"])
    if args.init:
        start_weights = load_file(Path(args.init) / "model.safetensors")
        module.unet.load_state_dict(start_weights)
        module.ema.module.load_state_dict(start_weights)
    gpu = args.device.startswith("cuda")
    trainer = pl.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1,
        precision=config["trainer"].get("precision", "32-true") if gpu else "32-true",
        max_time={"seconds": args.train_seconds}, max_steps=config["trainer"]["max_steps"], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=config["trainer"].get("gradient_clip_val"),
    )
    with harness.stopwatch() as lap:
        trainer.fit(module, loader)
    seconds = lap.seconds
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
    module.pipeline(ema=True).save_pretrained(args.out, overwrite=True)
    log = {"steps": trainer.global_step, "batch_size": batch_size, "train_seconds": round(seconds, 1),
           "last_loss": loss, "mri_slices": len(planes), "dead_leaves_images": len(leaves),
           "dead_leaves_prob": leaves_prob,
           "device": torch.cuda.get_device_name() if gpu else "cpu", "config": args.config, "init": args.init}
    harness.write_result("train_denoiser", args, log, Path(args.out) / "train_log.json")
    print(json.dumps(log), flush=True)


if __name__ == "__main__":
    harness.main(run, options)
