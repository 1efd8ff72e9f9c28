"""Rician (one coil) and noncentral chi (N coils) bias correction of a denoised magnitude MR image: the noise floor
in dark tissue and air.

A magnitude image is ``M = |A + n|`` with ``n`` complex Gaussian noise of standard deviation
``sigma`` per channel: ``M`` is Rician with mean ``sigma * rice.mean(A / sigma)``, which is
``sigma * sqrt(pi / 2)`` (about 1.25 sigma) where the true amplitude ``A`` is 0 and tends to ``A``
only where ``A >> sigma``. A denoiser trained for additive Gaussian noise averages ``M``, so it
estimates that mean, not ``A``: air and dark tissue keep a grey floor. Inverting the mean maps the
denoised value back to the amplitude; values at or below the floor become 0. The root-sum-of-squares of N coils
(``--coils N``) is noncentral chi with 2N degrees of freedom (Constantinides et al. 1997): its mean
``sigma sqrt(2) Gamma(N + 1/2) / Gamma(N) 1F1(-1/2; N; -A^2 / (2 sigma^2))`` is Rician's for N = 1, and its floor
rises with N (2.74 sigma for 4 coils).

The inverse is a table of that mean (scipy's ``hyp1f1``; monotonic in ``A``, accurate to 1e-5 sigma); above
``A = 36 sigma`` ``E[M] = sqrt(A^2 + (2N - 1) sigma^2)`` to within 1e-4 sigma. Chosen by measurement against
``sqrt(max(M^2 - k sigma^2, 0))`` for k = 1, pi/2 and 2
on two held-out MR slices (BENCHMARKS.md): k = 2 empties the background best but darkens dark
tissue (-0.25 sigma, -1.2 dB foreground PSNR on the shoulder at 9 %), k = 1 leaves 0.7 sigma of floor.

The inverse is steep near the floor, so a sigma that is too high sets dark tissue to 0: the estimator's
background fit, on an image without air, takes dark tissue for background and gives 1.25-2.6 times the
added noise (measured on pydicom's 64x64 MR slices; BENCHMARKS.md, "Rician correction safety"). ``floor_sigma``
therefore removes the floor only where the image shows it: a background whose sigma agrees with
the Gaussian sigma of bright tissue within ``break_even``, at 95 % confidence.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.optimize import brentq
from scipy.special import gammaln, hyp1f1

from meddiff.diffusion.noise_level import NoiseEstimate

# The inverse as a table on a uniform grid of u = sqrt(mean / sigma - floor): the amplitude is a smooth function of u
# (steep in the mean itself near the floor), and a uniform grid makes each lookup arithmetic. Written by hand
# because np.interp's binary search is slow on a volume's unsorted values (measured: 0.116 s against 0.029 s for a
# 256x256 slice) and scipy has no noncentral chi distribution.
_NU_TABLE_END = 36.0
_CHUNK = 1 << 22  # voxels per step: float64 temporaries stay at tens of MB for any volume
_CONFIDENCE_Z = 1.645  # one-sided 95 %


def chi_mean(nu: np.ndarray | float, coils: int = 1) -> np.ndarray:
    """Mean of the magnitude of ``coils`` complex Gaussian channels (sigma 1) around amplitude ``nu``:
    Rician for one coil, noncentral chi with 2 ``coils`` degrees of freedom otherwise."""
    scale = np.sqrt(2.0) * np.exp(gammaln(coils + 0.5) - gammaln(coils))
    return scale * hyp1f1(-0.5, coils, -np.square(nu) / 2.0)


@functools.lru_cache(maxsize=8)
def _inverse_table(coils: int) -> tuple[float, float, np.ndarray, float]:
    """(floor, u step, amplitude at each u, mean / sigma at the table's end) for ``coils``."""
    nu = np.linspace(0.0, _NU_TABLE_END, 3601)
    floor = float(chi_mean(0.0, coils))
    u = np.sqrt(np.maximum(chi_mean(nu, coils) - floor, 0.0))
    step = float(u[-1]) / 8000
    return floor, step, np.interp(np.arange(8001) * step, u, nu), floor + float(u[-1]) ** 2


@functools.lru_cache(maxsize=8)
def break_even(coils: int = 1) -> float:
    """Corrected with ``c * sigma`` where the noise is sigma (c > 1), every amplitude whose mean is under the floor
    at ``c * sigma`` becomes 0: an error of A, against mean(A) - A without the correction. That is no worse while
    those amplitudes stay below the A with mean(A) = 2 A (0.70 sigma for one coil): up to this c (1.119 for one
    coil) the correction of the exact mean is no worse than none for every amplitude; any c <= 1 under-corrects."""
    return 2.0 * brentq(lambda nu: float(chi_mean(nu, coils)) - 2.0 * nu, 0.1, 20.0) / float(chi_mean(0.0, coils))


BREAK_EVEN = break_even(1)


def rician_amplitude(mean: np.ndarray, sigma: float | np.ndarray, coils: int = 1) -> np.ndarray:
    """The amplitude ``A >= 0`` whose magnitude mean (noise ``sigma`` per channel, ``coils`` channels: Rician for one)
    is ``mean``; float32. ``sigma``: one value, or one per voxel (a noise map of ``mean``'s shape). Means at or below
    the noise floor (``sigma * sqrt(pi / 2)`` for one coil; negative values too) give 0."""
    sigma = np.asarray(sigma, dtype=np.float64)
    if not (np.isfinite(sigma).all() and (sigma > 0).all()):
        raise ValueError(f"sigma must be positive and finite, got {sigma if sigma.ndim == 0 else 'a map that is not'}")
    floor, step, nu_of_u, x_max = _inverse_table(int(coils))
    mean = np.asarray(mean)
    out = np.empty(mean.shape, np.float32)
    flat_in, flat_out = mean.reshape(-1), out.reshape(-1)
    flat_sigma = np.broadcast_to(sigma, mean.shape).reshape(-1)
    for start in range(0, flat_in.size, _CHUNK):
        scale = flat_sigma[start : start + _CHUNK]
        x = flat_in[start : start + _CHUNK].astype(np.float64) / scale
        position = np.sqrt(np.clip(x, floor, x_max) - floor) / step
        index = np.minimum(position.astype(np.intp), nu_of_u.size - 2)
        nu = nu_of_u[index] + (position - index) * (nu_of_u[index + 1] - nu_of_u[index])
        high = x > x_max  # E[M] = sqrt(A^2 + (2N - 1) sigma^2) to within 1e-4 sigma there
        nu[high] = np.sqrt(x[high] ** 2 - (2 * coils - 1))
        flat_out[start : start + _CHUNK] = nu * scale
    return out


def floor_sigma(noise: NoiseEstimate, coils: int = 1) -> float | None:
    """The sigma to remove the Rician floor with, or None where the image does not show the floor reliably.

    The floor is where the true signal is 0: a background. Its Rayleigh sigma and the Gaussian sigma of bright
    tissue (the two measurements of magnitude-MR noise of Aja-Fernandez et al. 2009, from the background and
    from the signal area) then measure the same noise; dark tissue taken for background makes the first the
    larger. The floor is removed, with the smaller of the two, only when the background's sigma is within
    ``break_even(coils)`` of the tissue's at 95 % confidence (their ``spread``): then whichever of the two is the
    noise, correcting the exact mean leaves no voxel further from its amplitude than no correction does.
    Otherwise the floor is kept.
    A tissue sigma above the background's (texture) is safe: the background's is used.
    """
    if noise.background is None or noise.tissue is None:
        return None
    if noise.background * np.exp(_CONFIDENCE_Z * noise.spread) > break_even(coils) * noise.tissue:
        return None
    return min(noise.background, noise.tissue)


def correct_rician_bias(denoised: np.ndarray, sigma: float | np.ndarray | None, source, enabled: bool = True,
                        coils: int = 1) -> np.ndarray:
    """``denoised`` with the Rician floor removed when ``source`` (the noisy ``Image``) is magnitude MR.

    Magnitude MR: modality MR or unknown, and no negative value. ``sigma`` is the noise in image units (given, or
    ``floor_sigma`` of the estimate, or a noise map; None: the floor is kept), not scaled by the denoising strength:
    the floor is a property of the data, whatever fraction of the noise the network was asked to remove.
    """
    if sigma is None or not enabled or source.modality not in (None, "MR") or float(source.array.min()) < 0:
        return denoised
    return rician_amplitude(denoised, sigma, coils)
