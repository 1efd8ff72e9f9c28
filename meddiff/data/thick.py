"""Thick slices as a scanner makes them, and interpolation back through them: the data of super-resolution.

A thick slice is the thin signal averaged over the slice profile (a box the slice thickness wide, centred on the
slice position) and sampled every slice spacing; a thickness below the spacing leaves gaps between slices, one
above it overlaps them. Positions are in voxels of the thin grid and may fall between voxels (a 5 mm slice over
1.4 mm voxels), so the average is taken from the running integral of the voxels rather than a kernel: voxel ``i``
covers ``[i - 0.5, i + 0.5]``. scipy's filters take whole-voxel kernels only, hence this small hand-written part.

``RandThickSlicesd`` makes a super-resolution model's training pairs from thin 2D slices: the last axis made thick
with a random spacing, thickness and phase, then interpolated back (the condition the model sees). At inference
the same interpolation of a real thick scan is the condition (``meddiff.pipelines.upsample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable
from scipy.interpolate import make_interp_spline

from meddiff.errors import MeddiffError

CONDITION_KEY = "upsample_condition"


def slab_average(array: np.ndarray, axis: int, centres: Sequence[float], thickness: float) -> np.ndarray:
    """``array`` averaged along ``axis`` over boxes ``thickness`` voxels wide centred on ``centres`` (one slice per
    centre, stacked along ``axis``); boxes are clipped to the array, a box under one voxel wide samples it."""
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    n = moved.shape[0]
    running = np.concatenate([np.zeros((1, *moved.shape[1:])), np.cumsum(moved, axis=0)])  # integral at i - 0.5
    width = max(float(thickness), 1e-3)
    slices = []
    for centre in centres:
        low, high = np.clip([centre - width / 2, centre + width / 2], -0.5, n - 0.5)
        slices.append((_integral(running, high) - _integral(running, low)) / max(high - low, 1e-9))
    return np.moveaxis(np.stack(slices), 0, axis).astype(np.float32)


def _integral(running: np.ndarray, x: float) -> np.ndarray:
    """The integral of the voxels from -0.5 to ``x`` (linear within a voxel)."""
    at = x + 0.5
    whole = min(int(np.floor(at)), running.shape[0] - 1)
    if whole == running.shape[0] - 1:
        return running[whole]
    return running[whole] + (at - whole) * (running[whole + 1] - running[whole])


def through_plane(samples: np.ndarray, axis: int, positions: Sequence[float], size: int) -> np.ndarray:
    """The slices ``samples`` (stacked along ``axis``, at ``positions`` in voxels of the output grid) interpolated
    onto voxels 0 .. ``size - 1`` along that axis: a cubic spline (not-a-knot; linear for two slices, the slice
    itself for one), through each sample exactly. Beyond the first and last slice the edge slice is repeated: a
    spline would extrapolate."""
    positions = np.asarray(positions, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    where = np.clip(np.arange(size, dtype=np.float64), positions[0], positions[-1])
    if len(positions) == 1:
        return np.repeat(samples, size, axis=axis).astype(np.float32)
    spline = make_interp_spline(positions, samples, k=min(3, len(positions) - 1), axis=axis)
    out = spline(where)
    known = np.flatnonzero(np.abs(positions - np.round(positions)) < 1e-6)  # exactly the samples, not to rounding
    for j in known:
        index = int(round(positions[j]))
        if 0 <= index < size:
            np.moveaxis(out, axis, 0)[index] = np.take(samples, j, axis=axis)
    return out.astype(np.float32)


def thick_and_back(array: np.ndarray, axis: int, spacing: float, thickness: float, phase: float = 0.0) -> np.ndarray:
    """``array`` made thick along ``axis`` (slices every ``spacing`` voxels from ``phase``, each ``thickness``
    voxels thick) and interpolated back onto its own grid: what a thick acquisition, upsampled classically, shows."""
    n = array.shape[axis]
    centres = np.arange(phase, n - 0.5, spacing)
    return through_plane(slab_average(array, axis, centres, thickness), axis, centres, n)


class RandThickSlicesd(Randomizable, MapTransform):
    """A super-resolution training pair from a thin 2D slice: its last axis made thick and interpolated back, in
    ``CONDITION_KEY`` (1, H, W), the model's concatenated condition; the model learns ``image - condition``.

    ``spacing``: slice spacing in voxels (uniform); ``thickness``: slice thickness as a fraction of the spacing
    (under 1: gaps, over 1: overlap); ``noise``: the standard deviation, in model units, of noise added to the thick
    slices (a thick slice is averaged over more tissue, so less noisy than a thin one, but not noise-free).
    """

    def __init__(self, key: str = "image", spacing: Sequence[float] = (2.0, 6.0),
                 thickness: Sequence[float] = (0.7, 1.2), noise: Sequence[float] = (0.0, 0.01)):
        super().__init__([key])
        if not 1.0 < spacing[0] <= spacing[1]:
            raise MeddiffError(f"spacing must be a range low <= high of voxels, above 1, not {list(spacing)}")
        if not 0.0 < thickness[0] <= thickness[1]:
            raise MeddiffError(f"thickness must be a range of positive fractions of the spacing, not {list(thickness)}")
        if not 0.0 <= noise[0] <= noise[1]:
            raise MeddiffError(f"noise must be a range of standard deviations >= 0, not {list(noise)}")
        self.key, self.spacing, self.thickness, self.noise = key, tuple(spacing), tuple(thickness), tuple(noise)

    def __call__(self, data):
        d = dict(data)
        image = np.asarray(d[self.key], dtype=np.float32)[0]
        spacing = self.R.uniform(*self.spacing)
        thickness = spacing * self.R.uniform(*self.thickness)
        phase = self.R.uniform(0.0, min(spacing, image.shape[-1] - 1))
        centres = np.arange(phase, image.shape[-1] - 0.5, spacing)
        thick = slab_average(image, 1, centres, thickness)
        thick = thick + self.R.normal(0.0, self.R.uniform(*self.noise), thick.shape).astype(np.float32)
        condition = through_plane(thick, 1, centres, image.shape[-1])
        d[CONDITION_KEY] = torch.from_numpy(condition[None])
        return d
