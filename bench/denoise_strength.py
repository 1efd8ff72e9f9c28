"""Sweep a trained denoiser's strength on the validation image: how ``inference.denoise_strength`` of
``configs/mri_denoise_2d.yaml`` was chosen.

The strength (the fraction of the estimated noise sigma the model is asked to remove) is chosen from
``--strengths`` by the mean foreground PSNR over ``--levels`` % Rician noise (seeds 100 + level) on
dipy's ``t1_coronal_slice``, the validation image; the independent test images of
``python -m bench.denoise`` play no part. ``--tile``: the side of the tiles denoising runs on (128 beat the
96 px training crops by 0.3 dB on the validation image, see BENCHMARKS.md, "Denoising load"). Appends the
sweep to ``--log`` (JSON lines, one record each in the harness's layout).

    python -m bench.denoise_strength runs/models/mri-denoise/model
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench import harness
from meddiff import Image
from meddiff.data.samples import dipy_t1_slice
from meddiff.data.synthetic import rician_noise
from meddiff.metrics import foreground_mask, psnr
from meddiff.pipelines import load_pipeline


def sweep(model: str, strengths: list[float], levels: list[float], tile: int) -> dict[float, list[float]]:
    pipeline = load_pipeline(model)
    pipeline.config.denoise_tile = [tile, tile]
    clean = dipy_t1_slice().array.squeeze().astype(np.float32)
    peak, mask = float(clean.max()), foreground_mask(clean)
    table = {s: [] for s in strengths}
    for level in levels:
        noisy = Image(rician_noise(clean, level / 100 * peak, np.random.default_rng(100 + int(level))), np.eye(4), "MR")
        for strength in strengths:
            table[strength].append(psnr(clean, pipeline.denoise(noisy, strength=strength).array, peak, mask))
    return table


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=None)
    parser.add_argument("model", help="a denoising model folder (meddiff export, make models)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 1.0])
    parser.add_argument("--levels", type=float, nargs="+", default=[1, 3, 5, 7, 9])
    parser.add_argument("--tile", type=int, default=128, help="side of the tiles denoising runs on")
    parser.add_argument("--log", default="bench/results/denoise_strength.jsonl")
    return parser


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    table = sweep(args.model, args.strengths, args.levels, args.tile)
    means = {s: float(np.mean(v)) for s, v in table.items()}
    best = max(means, key=means.get)
    for strength, values in table.items():
        print(f"strength {strength:.2f}: " + " ".join(f"{v:.2f}" for v in values) + f"  mean {means[strength]:.2f}")
    print(f"chosen strength {best} (validation mean PSNR {means[best]:.2f} dB)")
    record = {"model": args.model, "levels": args.levels, "psnr": {str(s): v for s, v in table.items()}, "chosen": best}
    with open(args.log, "a") as fh:
        fh.write(json.dumps(harness.record("denoise_strength", args, record)) + "\n")


if __name__ == "__main__":
    harness.main(run, options)
