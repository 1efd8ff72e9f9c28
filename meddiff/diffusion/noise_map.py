"""A map of the noise sigma across a magnitude MR image, for noise that varies in space.

Parallel imaging (SENSE, GRAPPA) amplifies the noise by the g-factor, which changes across the image, and surface
coils see the anatomy near them with less noise than the far side: one sigma per scan then removes too little
noise in one part and texture in another. The map is the local noise of bright tissue: the Immerkaer high-pass
response (``noise_level``), whose magnitude has mean ``6 sigma sqrt(2 / pi)`` on Gaussian noise, averaged with
Gaussian weights over bright, low-gradient voxels (where magnitude noise is nearly Gaussian and the response is
noise, not anatomy: the voxels ``noise_level.tissue_sigma`` uses) and spread by that normalised convolution into
the background and dark tissue, where the local noise cannot be read directly. Where no bright tissue is near, the
scan's own sigma stands.

Written by hand: dipy's PIESNO estimates one sigma per slice from the background of several volumes (no map
within a slice), and scikit-image's and dipy's ``estimate_sigma`` give one value per image or channel.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from meddiff.diffusion.noise_level import (
    _KERNEL_2D,
    _SOBEL,
    NoiseEstimate,
    _planar,
    bright_threshold,
    estimate_scan_noise,
)
from meddiff.errors import MeddiffError

WINDOW = 12.0  # voxels: the Gaussian's sigma; a g-factor map varies over centimetres, 3x across an image
_MEAN_ABS_TO_STD = np.sqrt(np.pi / 2.0) / 6.0  # Immerkaer: std 6 sigma; |N(0, s)| has mean s sqrt(2 / pi)
_MIN_WEIGHT = 1e-3  # below this share of bright voxels in the window, the scan's sigma stands


def estimate_noise_map(array: np.ndarray, coils: int = 1, window: float = WINDOW,
                       scan: NoiseEstimate | None = None) -> np.ndarray:
    """The noise sigma at every voxel of a 2D or 3D magnitude image (planes: the first two axes, as the scan
    estimators take them), float32, the image's shape and units. ``scan``: the image's ``estimate_scan_noise``
    where the caller has it already."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim not in (2, 3) or not np.isfinite(array).all():
        raise MeddiffError(f"a noise map needs a finite 2D or 3D image, not shape {array.shape}")
    if scan is None:
        scan = estimate_scan_noise(array, coils=coils)
    sigma = scan.tissue if scan.tissue is not None else scan.sigma
    local_mean = ndimage.uniform_filter(array, size=(3, 3) + (1,) * (array.ndim - 2), mode="reflect")
    bright = local_mean >= bright_threshold(coils) * sigma
    gradient = np.hypot(_planar(_SOBEL, array), _planar(_SOBEL.T, array))
    if bright.any():
        bright &= gradient <= np.quantile(gradient[bright], 0.9)
    response = np.abs(_planar(_KERNEL_2D, array)) * _MEAN_ABS_TO_STD
    spread = (window, window) + (0.0,) * (array.ndim - 2)  # within each plane
    weight = ndimage.gaussian_filter(bright.astype(np.float64), spread, mode="reflect")
    local = ndimage.gaussian_filter(np.where(bright, response, 0.0), spread, mode="reflect")
    noise = np.where(weight > _MIN_WEIGHT, local / np.maximum(weight, _MIN_WEIGHT), sigma)
    return noise.astype(np.float32)


def check_noise_map(noise_map: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A given map as float32 on the image's grid, or one line saying why it cannot be used."""
    noise_map = np.asarray(noise_map, dtype=np.float32)
    if noise_map.shape != tuple(shape):
        raise MeddiffError(f"the noise map has shape {noise_map.shape}, the image {tuple(shape)}: give a map on the "
                           "image's grid, in its units")
    if not (np.isfinite(noise_map).all() and (noise_map > 0).all()):
        raise MeddiffError("the noise map must be positive and finite everywhere (the noise sigma in image units)")
    return noise_map
