"""Network builders around MONAI's generative nets."""

from meddiff.nets.autoencoder import build_autoencoder, build_discriminator
from meddiff.nets.controlnet import build_controlnet, label_bits
from meddiff.nets.unet import build_unet

__all__ = ["build_autoencoder", "build_controlnet", "build_discriminator", "build_unet", "label_bits"]
