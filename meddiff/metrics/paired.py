"""Paired (reference vs estimate) metrics, optionally restricted to the anatomy (foreground).

Denoising papers report PSNR/SSIM on the foreground: the empty background of an MR image is large and
easy, and would otherwise dominate the score. SSIM is MONAI's (Gaussian window 11, sigma 1.5, the
Wang et al. 2004 constants); its per-pixel map is averaged over the mask.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage

from meddiff.errors import MeddiffError


def foreground_mask(reference: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Pixels above ``fraction`` of the reference maximum, holes filled: the anatomy, not the air around it."""
    return ndimage.binary_fill_holes(reference > fraction * float(reference.max()))


def _batched(array: np.ndarray) -> torch.Tensor:
    """A float64 (1, 1, *spatial) tensor, the layout MONAI's SSIM functions take."""
    return torch.as_tensor(np.asarray(array, np.float64))[None, None]


def _checked(reference: np.ndarray, estimate: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if np.shape(reference) != np.shape(estimate):
        raise MeddiffError(f"reference {np.shape(reference)} and estimate {np.shape(estimate)} differ in shape")
    mask = np.ones(reference.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != reference.shape or not mask.any():
        raise MeddiffError("the mask must have the image's shape and select at least one pixel")
    return mask


def psnr(reference: np.ndarray, estimate: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB over ``mask`` (everywhere when None)."""
    mask = _checked(reference, estimate, mask)
    mse = float(np.mean((np.asarray(reference, np.float64)[mask] - np.asarray(estimate, np.float64)[mask]) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(reference: np.ndarray, estimate: np.ndarray, data_range: float, mask: np.ndarray | None = None) -> float:
    """Structural similarity averaged over ``mask``; 2D or 3D images (singleton axes dropped), 11+ pixels a side.

    A volume thinner than the window along one axis (a few thick slices) is scored slice by slice in 2D
    along that axis, as its slices were acquired.
    """
    mask = _checked(reference, estimate, mask)
    keep = tuple(s for s in np.shape(reference) if s != 1)
    reference, estimate, mask = np.reshape(reference, keep), np.reshape(estimate, keep), np.reshape(mask, keep)
    thin = len(keep) == 3 and sorted(keep)[0] < 11 <= sorted(keep)[1]
    if thin:  # slices along the thin axis become a batch of 2D images
        axis = int(np.argmin(keep))
        reference, estimate, mask = (np.moveaxis(a, axis, 0) for a in (reference, estimate, mask))
        keep = keep[:axis] + keep[axis + 1 :]
    if len(keep) not in (2, 3) or min(keep) < 11:
        raise MeddiffError("SSIM needs a 2D or 3D image with at least 11 pixels a side (its window), "
                           f"got shape {np.shape(reference)}")
    ndim = len(keep)
    batch = (lambda a: torch.as_tensor(np.asarray(a, np.float64))[:, None]) if thin else _batched
    ssim_map, _ = compute_ssim_and_cs(batch(estimate), batch(reference), ndim, [11] * ndim, [1.5] * ndim, data_range)
    # the map is the 'valid' part of the convolution
    inner = mask[(slice(None),) * thin + tuple(slice(5, s - 5) for s in keep)]
    if not inner.any():
        raise MeddiffError("the mask lies within 5 pixels of the border, where SSIM's window does not fit")
    return float((ssim_map[:, 0] if thin else ssim_map[0, 0]).numpy()[inner].mean())


def ms_ssim(reference: np.ndarray, estimate: np.ndarray, data_range: float) -> float:
    """Multi-scale SSIM (MONAI, five scales: every side must exceed 160 pixels)."""
    from monai.metrics import MultiScaleSSIMMetric

    _checked(reference, estimate, None)
    reference, estimate = np.squeeze(reference), np.squeeze(estimate)
    if reference.ndim not in (2, 3) or min(reference.shape) <= 160:
        raise MeddiffError(f"MS-SSIM's five scales need every side above 160 pixels, the image is {reference.shape}")
    return float(MultiScaleSSIMMetric(spatial_dims=reference.ndim, data_range=data_range)(
        _batched(estimate), _batched(reference)).item())


def paired(reference: np.ndarray, estimate: np.ndarray, data_range: float | None = None,
           mask: np.ndarray | None = None) -> dict[str, float | None]:
    """PSNR, SSIM (over ``mask`` when given) and MS-SSIM (whole image; None below 161 pixels a side).

    ``data_range`` defaults to the reference's max - min.
    """
    reference, estimate = np.squeeze(np.asarray(reference, np.float64)), np.squeeze(np.asarray(estimate, np.float64))
    data_range = float(np.ptp(reference)) if data_range is None else float(data_range)
    if not data_range > 0:
        raise MeddiffError("the reference image is constant: PSNR and SSIM need a data range above 0")
    result = {"psnr": psnr(reference, estimate, data_range, mask), "ssim": ssim(reference, estimate, data_range, mask),
              "ms_ssim": None}
    if reference.ndim in (2, 3) and min(reference.shape) > 160:
        result["ms_ssim"] = ms_ssim(reference, estimate, data_range)
    return result
