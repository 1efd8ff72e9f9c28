"""Latent diffusion's two maps: image -> scaled latent (to train on) and scaled latent -> image (after sampling).

A latent is the encoder's posterior mean times the autoencoder's ``scale_factor`` (so the diffusion model sees
unit-variance latents, as in Rombach et al. 2022): the mean makes a latent a function of its image. A large
latent is decoded in overlapping tiles with Gaussian blending (MONAI's sliding-window inference, which scales
the output grid by the decoder's up-sampling), so memory stays bounded in the volume size, as MAISI decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode(autoencoder: torch.nn.Module, images: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Scaled latents of ``images`` (model units), without gradients: the first stage is frozen."""
    with torch.no_grad():
        mean, _ = autoencoder.encode(images)
    return mean * scale_factor


def decode(autoencoder: torch.nn.Module, latents: torch.Tensor, scale_factor: float,
           tile: Sequence[int] | None = None, overlap: float = 0.25) -> torch.Tensor:
    """Images (model units) from scaled latents; with ``tile`` (latent voxels) larger latents go tile by tile."""
    z = latents / scale_factor
    if tile is None or all(side <= t for side, t in zip(z.shape[2:], tile, strict=True)):
        return autoencoder.decode(z)
    from monai.inferers import sliding_window_inference

    return sliding_window_inference(z, list(tile), 1, autoencoder.decode, overlap=overlap, mode="gaussian")


def scale_factor(latents: torch.Tensor) -> float:
    """1 / std of unscaled training latents: the factor that gives the diffusion model unit-variance inputs."""
    return float(1.0 / latents.float().std().clamp_min(1e-8))
