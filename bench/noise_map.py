"""Noise that varies across the image: ``meddiff denoise`` with one sigma, with an estimated noise map
(``--noise-map estimate``) and with the true map, against BM3D (one sigma: the map's mean, which is what it takes)
and dipy non-local means given the true map (its ``sigma`` takes one value per voxel).

The held-out images of ``bench.denoise`` (the T1 slice, the validation image; the shoulder and the small head MR,
independent), with Rician noise whose sigma rises threefold from the left edge to the right (2 -> 6 % and
3 -> 9 % of the image's maximum; seed 7), as a g-factor or a surface coil makes it. Foreground PSNR and SSIM, the
median relative error of the estimated map in the foreground, and time. Writes ``noise_map.json`` and a table
(``noise_map.md``).

    OMP_NUM_THREADS=2 python -m bench.noise_map --out bench/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bench import harness
from bench.denoise import bm3d_denoise, held_out
from meddiff import Image
from meddiff.diffusion.noise_map import estimate_noise_map
from meddiff.metrics import foreground_mask, psnr, ssim
from meddiff.pipelines import load_pipeline

RAMPS = ((2.0, 6.0), (3.0, 9.0))


def ramp_noise(clean: np.ndarray, low: float, high: float, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, sigma map): Rician noise whose sigma rises linearly from ``low`` to ``high`` % of the maximum
    along the second axis."""
    peak = float(clean.max())
    sigma = np.broadcast_to(np.linspace(low, high, clean.shape[1])[None, :] / 100 * peak, clean.shape)
    rng = np.random.default_rng(seed)
    real = clean + rng.normal(0.0, 1.0, clean.shape) * sigma
    imaginary = rng.normal(0.0, 1.0, clean.shape) * sigma
    return np.sqrt(real**2 + imaginary**2).astype(np.float32), sigma.astype(np.float32)


def dipy_nlmeans_map(noisy: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    from dipy.denoise.nlmeans import nlmeans

    return nlmeans(noisy[..., None], sigma=sigma[..., None], rician=True, method="classic")[..., 0]


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    rows = []
    for name, clean in held_out().items():
        clean = clean.astype(np.float32)
        mask, peak = foreground_mask(clean), float(clean.max())
        for low, high in RAMPS:
            noisy, truth = ramp_noise(clean, low, high)
            image = Image(noisy, np.eye(4), "MR")
            estimated = estimate_noise_map(noisy)
            methods = {  # each bound to this image's arrays
                "noisy": lambda noisy=noisy: noisy,
                "BM3D (mean sigma)": lambda noisy=noisy, truth=truth: bm3d_denoise(noisy, float(truth.mean())),
                "dipy nlmeans (true map)": lambda noisy=noisy, truth=truth: dipy_nlmeans_map(noisy, truth),
                "meddiff (one sigma)": lambda image=image: pipeline.denoise(image, progress=False).array,
                "meddiff --noise-map estimate": lambda image=image: pipeline.denoise(image, progress=False,
                                                                                     local_noise=True).array,
                "meddiff (true map)": lambda image=image, truth=truth: pipeline.denoise(
                    image, progress=False, noise_map=truth).array,
            }
            map_error = float(np.median(np.abs(estimated[mask] / truth[mask] - 1.0)))
            for method, denoise in methods.items():
                with harness.stopwatch() as lap:
                    out = np.asarray(denoise(), dtype=np.float32)
                rows.append({"image": name, "noise": f"{low:g} -> {high:g} %", "method": method,
                             "psnr": psnr(clean, out, peak, mask), "ssim": ssim(clean, out, peak, mask),
                             "seconds": lap.seconds, "map_median_relative_error": map_error})
                print(f"{name[:30]:30s} {low:g}->{high:g}% {method:30s} PSNR {rows[-1]['psnr']:6.2f} "
                      f"SSIM {rows[-1]['ssim']:.3f} {lap.seconds:6.2f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result("noise_map", args, {"model": args.model, "rows": rows}, out / "noise_map.json")
    (out / "noise_map.md").write_text(table(rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| image | noise | map error | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 3)]
    for image in dict.fromkeys(r["image"] for r in rows):
        for noise in dict.fromkeys(r["noise"] for r in rows):
            cell = {r["method"]: r for r in rows if r["image"] == image and r["noise"] == noise}
            error = next(iter(cell.values()))["map_median_relative_error"]
            lines.append(f"| {image.split(' (')[0]} | {noise} | {error:.1%} | "
                         + " | ".join(f"{cell[m]['psnr']:.2f} / {cell[m]['ssim']:.3f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results", out_help="the folder of the JSON record and table "
                            "(default: %(default)s)")
    parser.add_argument("--model", default="mri-denoise")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser


if __name__ == "__main__":
    harness.main(run, options)
