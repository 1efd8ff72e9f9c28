"""Time and memory of 3D inpainting: a 30 mm sphere in a real brain volume with the 3D model of
``configs/mri_inpaint_3d.yaml`` (64^3 tiles at 2 mm), patch-wise, on this machine.

The network's weights are random (the 3D model needs a GPU to train: its cost is in the config), so this
measures cost, not quality. The volume is nilearn's MNI152 T1 (1 mm, 197x233x189). ``meddiff inpaint``
resamples the region around the sphere (its bounding box widened by half a tile on every side) to 2 mm and
runs the network on overlapping 64^3 tiles at every step. Reports the seconds per step, the tiles per step,
and the peak resident memory of the process (the model, the volume, and the sampling state), in JSON.

    OMP_NUM_THREADS=2 python -m bench.inpaint_3d --steps 5
"""

from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import numpy as np
import torch
import yaml

from bench import harness
from meddiff.data.samples import nilearn_mni152
from meddiff.training import DiffusionModule

CONFIG = harness.ROOT / "configs" / "mri_inpaint_3d.yaml"


class TileCounter(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.tiles = unet, 0

    def forward(self, x, **kwargs):
        self.tiles += x.shape[0]
        return self.unet(x, **kwargs)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results",
                            out_help="the folder of the JSON record (inpaint_3d.json) (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--radius-mm", type=float, default=15.0)
    return parser


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    module = DiffusionModule(**yaml.safe_load(CONFIG.read_text())["model"]["init_args"])
    for p in module.unet.parameters():  # random, not zero, output layer: the cost is that of a trained net
        torch.nn.init.normal_(p, std=0.02)
    pipeline = module.pipeline(ema=False)
    pipeline.unet = counter = TileCounter(pipeline.unet)
    volume = nilearn_mni152()
    centre = np.array(volume.array.shape) // 2
    grid = np.ogrid[tuple(slice(0, n) for n in volume.array.shape)]
    spacing = np.array(volume.spacing)
    sphere = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing, strict=True)) <= args.radius_mm**2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with harness.stopwatch() as lap:
        filled = pipeline.inpaint(volume, sphere, steps=args.steps, scheduler="ddim", progress=False)[0]
    seconds = lap.seconds
    assert np.array_equal(filled.array[~sphere], volume.array[~sphere])
    record = {
        "volume": list(volume.array.shape), "spacing_mm": [round(float(s), 3) for s in spacing],
        "sphere_mm": 2 * args.radius_mm, "sphere_voxels": int(sphere.sum()), "steps": args.steps,
        "seconds_per_step": seconds / args.steps, "tiles_per_step": counter.tiles / args.steps,
        "tile": list(pipeline.config.image.shape), "parameters": sum(p.numel() for p in module.unet.parameters()),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": before / 2**20, "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result("inpaint_3d", args, record, out / "inpaint_3d.json")
    print(json.dumps(record))


if __name__ == "__main__":
    harness.main(run, options)
