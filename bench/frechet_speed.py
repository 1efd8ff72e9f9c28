"""Time ``meddiff.metrics.frechet_distance`` against the scipy ``sqrtm`` path (pytorch-fid), MONAI's
FIDMetric and torchmetrics' FID on the same 2048-dimensional features (alternating, medians).

    python -m bench.frechet_speed [--n 5000] [--dim 2048] [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.metrics import FIDMetric
from scipy import linalg

from bench import harness
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


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("frechet_speed"), repeats=5)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=2048)
    return parser


def run(args: argparse.Namespace) -> None:
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
        for name, distance in methods.items():
            with harness.stopwatch(times[name]):
                values[name] = distance()
    timings = {name: harness.summary(runs) for name, runs in times.items()}
    base = timings["meddiff.frechet_distance"]["median"]
    print(f"{args.n} x {args.dim} features per set, {args.repeats} alternating repeats, "
          f"torch threads {torch.get_num_threads()}")
    for name in methods:
        median = timings[name]["median"]
        print(f"| {name} | {median:.2f} s | {median / base:.2f} | {values[name]:.6f} |")
    results = {name: {**{f"{k}_s": v for k, v in timings[name].items()},
                      "ratio_to_meddiff": timings[name]["median"] / base, "distance": values[name]} for name in methods}
    harness.write_result("frechet_speed", args, {"n": args.n, "dim": args.dim, "repeats": args.repeats,
                                                 "torch_threads": torch.get_num_threads(), "methods": results},
                         args.out)


if __name__ == "__main__":
    harness.main(run, options)
