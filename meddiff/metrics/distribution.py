"""Distribution metrics on feature vectors: Frechet distance, precision/recall, density/coverage, memorisation.

Features come from any extractor (``meddiff.metrics.features``); these functions only see (N, D)
arrays. Computed in float64. Nearest-neighbour searches use ``torch.cdist`` in row blocks reduced
as they come, so memory grows with N x 2048, not N x N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meddiff.errors import MeddiffError


def _features(x, name: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise MeddiffError(f"{name} must be an (N, D) array of features with N >= 2, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MeddiffError(f"{name} contains NaN or infinite values")
    return array


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``; the last trace is the sum of the
    square roots of the eigenvalues of the symmetric ``S_a^(1/2) S_b S_a^(1/2)`` (same spectrum as
    ``S_a S_b``), so singular covariances (fewer samples than dimensions) need no regularising offset
    and no complex ``sqrtm``.
    """
    a, b = _features(feats_a, "feats_a"), _features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise MeddiffError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    product = root_a @ cov_b @ root_a
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


def _blocks(x: np.ndarray, y: np.ndarray, block: int = 2048):
    """Row blocks of the Euclidean distance matrix between ``x`` and ``y``: (offset, (block, len(y)))."""
    ty = torch.from_numpy(y)
    for start in range(0, len(x), block):
        yield start, torch.cdist(torch.from_numpy(x[start : start + block]), ty).numpy()


def _kth_neighbour_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    if k >= len(x):
        raise MeddiffError(f"k={k} needs more than {k} samples per set, got {len(x)}")
    return np.concatenate([np.partition(d, k, axis=1)[:, k] for _, d in _blocks(x, x)])  # column 0: the point itself


def precision_recall(real, fake, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour balls.

    Precision: share of fake samples inside some real sample's ball (fidelity); recall: share of real
    samples inside some fake sample's ball (diversity).
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    real_radius, fake_radius = _kth_neighbour_radius(r, k), _kth_neighbour_radius(f, k)
    precision = np.concatenate([(d < real_radius[None, :]).any(axis=1) for _, d in _blocks(f, r)]).mean()
    recall = np.concatenate([(d < fake_radius[None, :]).any(axis=1) for _, d in _blocks(r, f)]).mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real, fake, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020), robust to outliers where precision/recall are not.

    Density: how many real balls contain each fake sample, divided by k (about 1 for matching
    distributions); coverage: share of real balls that contain at least one fake sample.
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    radius = _kth_neighbour_radius(r, k)
    density = np.concatenate([(d < radius[None, :]).sum(axis=1) for _, d in _blocks(f, r)]).mean() / k
    coverage = np.concatenate([d.min(axis=1) < radius[start : start + len(d)] for start, d in _blocks(r, f)]).mean()
    return {"density": float(density), "coverage": float(coverage)}


def _two_nearest(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of ``x``: index of the nearest row of ``y``, and the nearest and second-nearest distances."""
    nearest, first, second = [], [], []
    for _, d in _blocks(x, y):
        two = np.argpartition(d, 1, axis=1)[:, :2] if d.shape[1] > 1 else np.zeros((len(d), 2), dtype=int)
        pair = np.take_along_axis(d, two, axis=1)
        order = np.argsort(pair, axis=1)
        nearest.append(np.take_along_axis(two, order, axis=1)[:, 0])
        pair = np.take_along_axis(pair, order, axis=1)
        first.append(pair[:, 0])
        second.append(pair[:, 1])
    return np.concatenate(nearest), np.concatenate(first), np.concatenate(second)


@dataclass
class Memorization:
    """Nearest training neighbours of generated samples.

    ``nearest``: index of each fake sample's closest training sample; ``distance``: that distance;
    ``ratio``: closest over second-closest distance (near 0: one training sample stands out, a copy);
    ``near_copy_fraction``: share of fakes with ``ratio`` below the threshold; ``holdout_ratio``:
    median nearest-training distance of fakes over that of held-out real samples (below 1: fakes sit
    closer to the training set than new real data does), when held-out features were given.
    """

    nearest: np.ndarray
    distance: np.ndarray
    ratio: np.ndarray
    near_copy_fraction: float
    threshold: float
    holdout_ratio: float | None = None

    def summary(self) -> dict[str, float | None]:
        return {"near_copy_fraction": self.near_copy_fraction, "median_ratio": float(np.median(self.ratio)),
                "median_distance": float(np.median(self.distance)), "holdout_ratio": self.holdout_ratio,
                "threshold": self.threshold}


def memorization(train_feats, fake_feats, threshold: float = 0.5, holdout_feats=None) -> Memorization:
    """How close generated samples come to their training set (near-copies of training images)."""
    train, fake = _features(train_feats, "train_feats"), _features(fake_feats, "fake_feats")
    nearest, first, second = _two_nearest(fake, train)
    holdout = None
    if holdout_feats is not None:
        held = _two_nearest(_features(holdout_feats, "holdout_feats"), train)[1]
        holdout = float(np.median(first) / max(np.median(held), 1e-12))
    ratio = first / np.maximum(second, 1e-12)
    return Memorization(nearest, first, ratio, float((ratio < threshold).mean()), threshold, holdout)
