"""Benchmark (b): sample quality against the number of network evaluations, on the MNI slice model.

Reads the samples written by ``python -m bench.train_mni_gpu`` and the real slices of ``bench.mni_slices``
and reports two distribution distances to the real slices (lower is better):

- SWD: sliced Wasserstein distance between 7x7 Laplacian-pyramid patches (Karras et al. 2018,
  "Progressive Growing of GANs"), averaged over pyramid levels, x 1e3. Written by hand here: no
  maintained package computes it; the evaluation issue brings medical feature spaces.
- FD-PCA: Frechet distance between Gaussian fits of 32-dim PCA features (PCA fitted on the real slices).

    python -m bench.sampler_quality --samples OUT --out bench/results/mni_sampler_quality.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from bench import harness


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    kernel = torch.tensor([1, 4, 6, 4, 1], dtype=x.dtype)
    kernel = (kernel[:, None] * kernel[None, :] / 256).view(1, 1, 5, 5)
    pyramid = []
    for _ in range(levels - 1):
        blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel)
        down = blurred[..., ::2, ::2]
        up = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
        pyramid.append(x - up)
        x = down
    return [*pyramid, x]


def patches(level: torch.Tensor, per_image: int, rng: np.random.Generator) -> torch.Tensor:
    unfolded = F.unfold(level, kernel_size=7)  # (N, 49, L)
    idx = torch.from_numpy(rng.integers(0, unfolded.shape[-1], size=(level.shape[0], per_image)))
    picked = torch.gather(unfolded, 2, idx[:, None, :].expand(-1, 49, -1))
    return picked.permute(0, 2, 1).reshape(-1, 49)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int, rng: np.random.Generator) -> float:
    n = min(len(a), len(b))
    a, b = a[torch.from_numpy(rng.permutation(len(a))[:n])], b[torch.from_numpy(rng.permutation(len(b))[:n])]
    directions = torch.from_numpy(rng.standard_normal((a.shape[1], projections))).float()
    directions /= directions.norm(dim=0, keepdim=True)
    pa, _ = torch.sort(a @ directions, dim=0)
    pb, _ = torch.sort(b @ directions, dim=0)
    return float((pa - pb).abs().mean())


def swd(real: np.ndarray, fake: np.ndarray, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    levels = 3
    pr = laplacian_pyramid(torch.from_numpy(real)[:, None].float(), levels)
    pf = laplacian_pyramid(torch.from_numpy(fake)[:, None].float(), levels)
    distances = []
    for lr, lf in zip(pr, pf, strict=True):
        a, b = patches(lr, 128, rng), patches(lf, 128, rng)
        mean, std = a.mean(0), a.std(0) + 1e-8  # normalise by the real descriptors' statistics
        distances.append(np.mean([sliced_wasserstein((a - mean) / std, (b - mean) / std, 512, rng) for _ in range(4)]))
    return 1e3 * float(np.mean(distances))


def fd_pca(real: np.ndarray, fake: np.ndarray, dims: int = 32) -> float:
    r, f = real.reshape(len(real), -1).astype(np.float64), fake.reshape(len(fake), -1).astype(np.float64)
    mean = r.mean(0)
    _, _, vt = np.linalg.svd(r - mean, full_matrices=False)
    basis = vt[:dims].T
    fr, ff = (r - mean) @ basis, (f - mean) @ basis
    mu1, mu2 = fr.mean(0), ff.mean(0)
    s1, s2 = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=None, out_aliases=("--json",), out_help="write the table as JSON here")
    parser.add_argument("--samples", required=True, help="folder with samples_*.npz and timings.json")
    parser.add_argument("--real", default=".gpu/slices.npy")
    return parser


def run(args: argparse.Namespace) -> None:
    real = np.load(args.real).astype(np.float32)[:, 0]
    real = np.concatenate([real, real[:, ::-1]])  # the model was trained with left-right flips
    timings = harness.read_result(Path(args.samples) / "timings.json")["sampling"]
    rows = []
    for key, seconds in timings.items():
        name, steps = key.rsplit("-", 1)
        samples_file = Path(args.samples) / f"samples_{name.replace('+', 'p')}_{steps}.npz"
        fake = np.load(samples_file)["samples"].astype(np.float32)
        rows.append({"sampler": name, "steps": int(steps), "swd": swd(real, fake), "fd_pca": fd_pca(real, fake),
                     "seconds": seconds})
    reference = next(r for r in rows if r["sampler"] == "ddpm")
    print("| sampler | network evaluations | SWD x1e3 | vs DDPM-1000 | FD-PCA | vs DDPM-1000 | "
          "wall time (256 samples) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['sampler']} | {r['steps']} | {r['swd']:.2f} | {r['swd'] / reference['swd']:.2f} | "
              f"{r['fd_pca']:.2f} | {r['fd_pca'] / reference['fd_pca']:.2f} | {r['seconds']:.1f} s |")
    if args.out:
        harness.write_result("sampler_quality", args, rows, args.out)


if __name__ == "__main__":
    harness.main(run, options)
