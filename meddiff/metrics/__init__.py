"""Image-quality metrics."""

from meddiff.metrics.paired import foreground_mask, psnr, ssim

__all__ = ["foreground_mask", "psnr", "ssim"]
