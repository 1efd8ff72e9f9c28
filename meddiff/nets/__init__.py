"""Network builders around MONAI's generative nets."""

from meddiff.nets.unet import build_unet

__all__ = ["build_unet"]
