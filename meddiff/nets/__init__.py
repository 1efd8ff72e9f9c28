"""Network builders around MONAI's generative nets."""

from meddiff.nets.autoencoder import build_autoencoder, build_discriminator
from meddiff.nets.unet import build_unet

__all__ = ["build_autoencoder", "build_discriminator", "build_unet"]
