"""Rician bias correction of a denoised magnitude MR image (the noise floor in dark tissue and air).

A magnitude image is ``M = |A + n|`` with ``n`` complex Gaussian noise of standard deviation
``sigma`` per channel: ``M`` is Rician with mean ``sigma * rice.mean(A / sigma)``, which is
``sigma * sqrt(pi / 2)`` (about 1.25 sigma) where the true amplitude ``A`` is 0 and tends to ``A``
only where ``A >> sigma``. A denoiser trained for additive Gaussian noise averages ``M``, so it
estimates that mean, not ``A``: air and dark tissue keep a grey floor. Inverting the mean maps the
denoised value back to the amplitude; values at or below the floor become 0.

The inverse is ``np.interp`` on a table of scipy's Rician mean (monotonic in ``A``); above
``A = 30 sigma``, where scipy's formula overflows, ``E[M] = sqrt(A^2 + sigma^2)`` to within
1e-5 sigma. Measured against ``sqrt(max(M^2 - k sigma^2, 0))`` for k = 1, pi/2, 2 on two held-out
MR slices (BENCHMARKS.md): the inverse of the mean keeps the best foreground PSNR there.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rice

# amplitude / sigma, dense where the mean is flat (near the floor), and the Rician mean / sigma there
_NU = np.concatenate([np.linspace(0.0, 10.0, 2001), np.linspace(10.05, 30.0, 400)])
_MEAN = rice.mean(_NU)
_CHUNK = 1 << 22  # voxels per np.interp call: float64 temporaries stay at tens of MB for any volume


def rician_amplitude(mean: np.ndarray, sigma: float) -> np.ndarray:
    """The amplitude ``A >= 0`` whose Rician mean (noise ``sigma`` per channel) is ``mean``; float32.

    Means at or below the noise floor ``sigma * sqrt(pi / 2)`` (including negative values) give 0.
    """
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive and finite, got {sigma}")
    mean = np.asarray(mean)
    out = np.empty(mean.shape, np.float32)
    flat_in, flat_out = mean.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _CHUNK):
        x = flat_in[start : start + _CHUNK].astype(np.float64) / sigma
        high = np.sqrt(np.maximum(x * x - 1.0, 0.0))
        flat_out[start : start + _CHUNK] = np.where(x > _MEAN[-1], high, np.interp(x, _MEAN, _NU)) * sigma
    return out


def correct_rician_bias(denoised: np.ndarray, sigma: float, source, enabled: bool = True) -> np.ndarray:
    """``denoised`` with the Rician floor removed when ``source`` (the noisy ``Image``) is magnitude MR.

    Magnitude MR: modality MR or unknown, and no negative value. ``sigma`` is the noise in image
    units (estimated or given), not scaled by the denoising strength: the floor is a property of
    the data, whatever fraction of the noise the network was asked to remove.
    """
    if not enabled or source.modality not in (None, "MR") or float(source.array.min()) < 0:
        return denoised
    return rician_amplitude(denoised, sigma)
