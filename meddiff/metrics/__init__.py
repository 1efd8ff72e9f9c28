"""Image-quality metrics: paired (PSNR, SSIM, MS-SSIM) and distribution metrics on features."""

from meddiff.metrics.distribution import Memorization, density_coverage, frechet_distance, memorization, precision_recall
from meddiff.metrics.paired import foreground_mask, ms_ssim, paired, psnr, ssim

__all__ = [
    "Memorization", "density_coverage", "foreground_mask", "frechet_distance", "memorization", "ms_ssim", "paired",
    "precision_recall", "psnr", "ssim",
]
