"""RePaint's time per 256x256 slice (``pipeline.inpaint``) against the raw network evaluations it makes.

The slice is dipy's real T1 coronal slice (256x256, 1 mm) with a 40x60 mm mask; the model's 2 mm voxels
make it a 128x128 image sampled on tiles of the model's 96x112 training shape (4 tiles per step).
"raw" times the same number of network calls on the same tile batches and nothing else. Runs alternate;
medians reported. ``--model``: a model folder (default: a fresh 4M-parameter benchmark UNet, which times
the same arithmetic as a trained one).

    python -m bench.inpaint_speed --model OUT/model --repeats 1
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench import harness
from bench.sampling_speed import benchmark_pipeline
from meddiff.data.samples import dipy_t1_slice
from meddiff.diffusion.repaint import RePaint
from meddiff.diffusion.tiling import tile_geometry
from meddiff.pipelines import DiffusionPipeline


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("inpaint_speed"), repeats=3)
    parser.add_argument("--model", help="model folder (default: a fresh benchmark-sized UNet)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resample", type=int, default=5)
    parser.add_argument("--jump", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def run(args: argparse.Namespace) -> None:
    pipeline = DiffusionPipeline.from_pretrained(args.model) if args.model else benchmark_pipeline("cpu")
    image = dipy_t1_slice()
    mask = np.zeros(image.array.shape, bool)
    mask[100:140, 90:150] = True
    calls = len(RePaint.plan_for(args.steps, args.jump, args.resample))
    sizes = zip(image.array.shape, image.spacing, pipeline.config.image.spacing, strict=True)
    model_shape = [round(n * s / m) for n, s, m in sizes]
    multiple = pipeline.config.unet.size_multiple
    _, tile, tiles = tile_geometry(model_shape, pipeline.config.image.shape, multiple)
    batches = [min(args.batch_size, tiles - start) for start in range(0, tiles, args.batch_size)]
    times = {"inpaint": [], "raw": []}
    for _ in range(args.repeats):
        with harness.stopwatch(times["inpaint"]):
            pipeline.inpaint(image, mask, steps=args.steps, resample=args.resample, jump=args.jump, progress=False,
                             batch_size=args.batch_size)
        with harness.stopwatch(times["raw"]), torch.inference_mode():
            for _ in range(calls):
                for size in batches:
                    pipeline.unet(torch.randn(size, 1, *tile), timesteps=torch.full((size,), 500))
    medians = {name: harness.summary(values)["median"] for name, values in times.items()}
    result = {"steps": args.steps, "resample": args.resample, "jump": args.jump, "network_steps": calls,
              "tiles_per_step": tiles, "tile": tile, **{f"{k}_s": v for k, v in times.items()},
              **{f"{k}_median_s": v for k, v in medians.items()},
              "ratio_to_raw_median": medians["inpaint"] / medians["raw"]}
    print(json.dumps(result, indent=2))
    harness.write_result("inpaint_speed", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
