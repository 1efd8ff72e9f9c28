"""Noise level of a magnitude MR image, estimated from the image itself (Rician-aware).

Magnitude MRI noise is Rician: in the empty background it is Rayleigh with parameter sigma, in
bright tissue nearly Gaussian with standard deviation sigma. The estimator uses the background
when the image has enough of it (second moment of the Rayleigh distribution, corrected for the
truncation that selects the background) and otherwise the median absolute value of a high-pass
band (Immerkaer's Laplacian-difference kernel, Donoho's MAD rule). Written by hand: dipy's and
scikit-image's estimators assume Gaussian noise or need several acquisitions (PIESNO).

Beside the sigma to denoise with, ``estimate_noise`` keeps the two independent measurements of it: the
background's Rayleigh sigma and the Gaussian sigma of bright tissue. Both measure the one noise of a
magnitude image; dark tissue taken for background inflates the first (a crop with no air), texture the
second. ``meddiff.diffusion.rician.floor_sigma`` removes the Rician floor only where they agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special, stats

from meddiff.errors import MeddiffError

# Immerkaer (1996): zero response to linear ramps; for white noise of std s its output has std 6 s.
_KERNEL_2D = np.array([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
_MAD_TO_STD = 1.0 / 0.6744897501960817
_SOBEL = np.outer([1.0, 2.0, 1.0], [-1.0, 0.0, 1.0])
# Standard error of each estimate on pure noise, times the square root of the voxels it used (Monte Carlo, 200
# draws of 64x64 and 128x128 images: 0.65-0.74 for the truncated Rayleigh fit; 1.65-1.84 for the MAD of the
# high-pass band, whose neighbouring responses are correlated)
_BACKGROUND_SE, _TISSUE_SE = 0.7, 1.8
_BACKGROUND_QUANTILE = 1.0 - np.exp(-2.5**2 / 2.0)  # a Rayleigh background truncated at 2.5 sigma


@dataclass(frozen=True)
class NoiseEstimate:
    """``sigma``: the noise to remove (image units); ``background``: the background's Rayleigh sigma, None
    when the image has too little background; ``tissue``: the Gaussian sigma of bright tissue, None when
    there is no background or too little bright tissue; ``spread``: the relative standard error of
    ``background / tissue`` from the voxels each used."""

    sigma: float
    background: float | None = None
    tissue: float | None = None
    spread: float = 0.0


def _planar(kernel: np.ndarray, array: np.ndarray) -> np.ndarray:
    """A 2D ``kernel`` over each plane of ``array`` (the first two axes), as ``highpass_sigma`` works."""
    return ndimage.convolve(array, kernel.reshape(kernel.shape + (1,) * (array.ndim - 2)), mode="reflect")


def highpass_sigma(array: np.ndarray) -> float:
    """Gaussian-noise sigma from the MAD of the high-pass band, slice by slice along the last axis."""
    planes = array[..., None] if array.ndim == 2 else array.reshape(*array.shape[:2], -1)
    responses = [
        ndimage.convolve(planes[..., k], _KERNEL_2D, mode="reflect")[1:-1, 1:-1] for k in range(planes.shape[-1])
    ]
    return float(np.median(np.abs(np.concatenate([r.ravel() for r in responses]))) * _MAD_TO_STD / 6.0)


def background_mean(coils: int = 1) -> float:
    """Mean of pure magnitude noise in sigma: sqrt(pi / 2) for one coil, chi's with 2 ``coils`` degrees of freedom
    otherwise (2.74 for four)."""
    return float(np.sqrt(2.0) * np.exp(special.gammaln(coils + 0.5) - special.gammaln(coils)))


def bright_threshold(coils: int = 1) -> float:
    """The local mean, in sigma, from which magnitude noise is nearly Gaussian: 3 for one coil (an SNR of 3:
    Gudbjartsson and Patz 1995), as far above the higher floor of more coils."""
    return 3.0 + background_mean(coils) - background_mean(1)


def background_sigma(array: np.ndarray, start: float, iterations: int = 20, coils: int = 1) -> tuple[float, float]:
    """The background's noise sigma and the fraction of voxels used, by fixed-point iteration.

    The background of a magnitude image is Rayleigh (one coil) or chi with 2 ``coils`` degrees of freedom (the
    root-sum-of-squares of ``coils``): ``(M / sigma)^2`` is chi-squared with 2N degrees of freedom. Background
    candidates: voxels whose 3x3 local mean is below 1.44 times the background's mean (1.8 sigma for one coil)
    and whose value is below ``T = c sigma`` (c at the same quantile for every N: 2.5 for one coil). Their second
    moment is ``2 N sigma^2 P(N + 1, a) / P(N, a)`` with ``a = T^2 / (2 sigma^2)`` and P the regularised lower
    incomplete gamma function (for one coil ``2 sigma^2 (1 - a exp(-a) / (1 - exp(-a)))``).
    """
    local_mean = ndimage.uniform_filter(array, size=3, mode="reflect")
    c = float(np.sqrt(stats.chi2.ppf(_BACKGROUND_QUANTILE, 2 * coils)))
    mean = background_mean(coils)
    a = c * c / 2.0
    second_moment = 2.0 * coils * special.gammainc(coils + 1, a) / special.gammainc(coils, a)
    # the local mean of Rayleigh(sigma) noise is about 1.25 sigma; tissue is far brighter
    local_limit = 1.8 / background_mean(1) * mean
    sigma, used = start, 0.0
    for _ in range(iterations):
        candidates = array[(local_mean < local_limit * sigma) & (array < c * sigma)]
        used = candidates.size / array.size
        if candidates.size < 100:
            return float("nan"), used
        new = float(np.sqrt(np.mean(candidates.astype(np.float64) ** 2) / second_moment))
        if abs(new - sigma) < 1e-4 * max(sigma, 1e-12):
            return new, used
        sigma = new
    return sigma, used


def tissue_sigma(array: np.ndarray, sigma: float, min_voxels: int = 100, coils: int = 1) -> tuple[float, int] | None:
    """Gaussian-noise sigma of bright tissue and the voxels used: the MAD rule on the high-pass band where the
    whole 3x3 neighbourhood has a local mean of at least 3 ``sigma`` (from an SNR of 3 on, Rician noise is
    nearly Gaussian: Gudbjartsson and Patz 1995; as far above the higher floor of ``coils`` > 1), leaving out the
    tenth with the strongest gradient (edges and texture, as Tai and Yang 2008 do). None when fewer than
    ``min_voxels`` voxels qualify."""
    local_mean = ndimage.uniform_filter(array, size=3, mode="reflect")
    structure = np.ones((3, 3) + (1,) * (array.ndim - 2), bool)
    bright = ndimage.binary_erosion(local_mean >= bright_threshold(coils) * sigma, structure=structure, border_value=0)
    if bright.sum() < min_voxels:
        return None
    gradient = np.hypot(_planar(_SOBEL, array), _planar(_SOBEL.T, array))[bright]
    response = np.abs(_planar(_KERNEL_2D, array))[bright]
    response = response[gradient <= np.quantile(gradient, 0.9)]
    return float(np.median(response) * _MAD_TO_STD / 6.0), response.size


def estimate_noise(array: np.ndarray, min_background: float = 0.05, coils: int = 1) -> NoiseEstimate:
    """Noise of the image in its own units (Rician-aware; noncentral chi for ``coils`` > 1); see the module
    docstring."""
    array = np.asarray(array, dtype=np.float64)
    if array.size == 0 or not np.isfinite(array).all():
        raise MeddiffError("noise estimation needs a non-empty image without NaN")
    if np.ptp(array) == 0:
        raise MeddiffError("the image is constant: there is no noise level to estimate")
    if array.min() < 0:
        return NoiseEstimate(highpass_sigma(array))  # not a magnitude image: no Rayleigh background
    start = highpass_sigma(array)
    sigma, used = background_sigma(array, start, coils=coils)
    if not (np.isfinite(sigma) and used >= min_background):
        return NoiseEstimate(start)
    tissue = tissue_sigma(array, sigma, coils=coils)
    if tissue is None:
        return NoiseEstimate(sigma, sigma)
    spread = float(np.hypot(_BACKGROUND_SE / np.sqrt(used * array.size), _TISSUE_SE / np.sqrt(tissue[1])))
    return NoiseEstimate(sigma, sigma, tissue[0], spread)


def scan_slices(array: np.ndarray, max_slices: int = 32) -> np.ndarray:
    """At most ``max_slices`` evenly spaced slices along the last axis of a scan (the estimator's own planes):
    the noise of a scan is the same in all of them, and the estimators work in float64 with filtered copies,
    gigabytes for a 512x512x300 volume. A 2D image stored as a volume (x, y, 1) is returned as the 2D image it is."""
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[2] > max_slices:
        array = array[..., np.linspace(0, array.shape[2] - 1, max_slices).round().astype(int)]
    return array


def estimate_scan_noise(array: np.ndarray, max_slices: int = 32, coils: int = 1) -> NoiseEstimate:
    """``estimate_noise`` of a scan's ``scan_slices``."""
    return estimate_noise(scan_slices(array, max_slices), coils=coils)


def estimate_noise_sigma(array: np.ndarray, min_background: float = 0.05) -> float:
    """Noise sigma in the image's own units (Rician-aware): ``estimate_noise(array).sigma``."""
    return estimate_noise(array, min_background).sigma


def timestep_for_sigma(sigma: float, alphas_cumprod) -> int:
    """The diffusion timestep whose noise matches ``sigma`` (in the model's [-1, 1] units).

    A noisy image ``y = x0 + sigma * eps`` scaled by ``sqrt(abar)`` is exactly a forward-process
    sample ``x_t`` when ``(1 - abar) / abar = sigma^2``, i.e. ``abar = 1 / (1 + sigma^2)`` (the
    matching DDM2 uses); returns the timestep with the nearest log-SNR.
    """
    if not sigma > 0:
        raise MeddiffError(f"noise sigma must be positive, got {sigma}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    log_snr = np.log(abar / (1.0 - abar))
    return int(np.argmin(np.abs(log_snr - np.log(1.0 / sigma**2))))
