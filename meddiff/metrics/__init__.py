"""Image-quality metrics: paired (PSNR, SSIM, MS-SSIM) and distribution metrics on features."""

from meddiff.metrics.distribution import (
    Memorization,
    density_coverage,
    frechet_distance,
    memorization,
    precision_recall,
)
from meddiff.metrics.paired import foreground_mask, ms_ssim, paired, psnr, ssim
from meddiff.metrics.text_image import clip_score

__all__ = [
    "Memorization", "clip_score", "density_coverage", "foreground_mask", "frechet_distance", "memorization", "ms_ssim",
    "paired", "precision_recall", "psnr", "ssim",
]
