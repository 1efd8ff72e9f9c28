"""Time ``meddiff.metrics.frechet_distance`` against the scipy ``sqrtm`` path (pytorch-fid), MONAI's
FIDMetric and torchmetrics' FID on the same 2048-dimensional features (alternating, medians).

    python bench/frechet_speed.py [--n 5000] [--dim 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from monai.metrics import FIDMetric
from scipy import linalg

from meddiff.metrics import frechet_distance


def scipy_sqrtm(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's calculate_frechet_distance (scipy.linalg.sqrtm of the covariance product)."""
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s1.dot(s2), disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def torchmetrics_fid(a: np.ndarray, b: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Identity(torch.nn.Module):
        num_features = a.shape[1]

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity(), normalize=True)
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    return float(metric.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((args.dim, args.dim)) / np.sqrt(args.dim)  # correlated features, like a network's
    a = np.maximum(rng.standard_normal((args.n, args.dim)) @ mix, 0)
    b = np.maximum((rng.standard_normal((args.n, args.dim)) + 0.1) @ mix, 0)
    methods = {
        "meddiff.frechet_distance": lambda: frechet_distance(a, b),
        "scipy.linalg.sqrtm (pytorch-fid)": lambda: scipy_sqrtm(a, b),
        "monai FIDMetric": lambda: float(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b))),
        "torchmetrics FID": lambda: torchmetrics_fid(a, b),
    }
    times = {name: [] for name in methods}
    values = {}
    for _ in range(args.repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            values[name] = run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["meddiff.frechet_distance"])
    print(f"{args.n} x {args.dim} features per set, {args.repeats} alternating repeats, "
          f"torch threads {torch.get_num_threads()}")
    for name in methods:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.2f} s | {median / base:.2f} | {values[name]:.6f} |")


if __name__ == "__main__":
    main()
