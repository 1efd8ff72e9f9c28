"""diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` behind the calls meddiff makes of MONAI's networks, so
Stable-Diffusion-family weights (a diffusers pipeline folder) run through meddiff's one sampling loop.

A UNet is called as MONAI's is, ``(x, timesteps, context, class_labels)``; an autoencoder answers ``encode(x)`` with
(mean, sigma) and ``decode(z)`` with the image, as MONAI's ``AutoencoderKL`` does. Each is built from the diffusers
config it was published with (``config.json`` of ``unet/`` or ``vae/``).
"""

from __future__ import annotations

import torch
from torch import nn


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` (its state under ``model.``) called as MONAI's UNet is."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.model = UNet2DConditionModel.from_config(config)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.model(x, timesteps, encoder_hidden_states=context, class_labels=class_labels).sample


class DiffusersAutoencoder(nn.Module):
    """A diffusers ``AutoencoderKL`` (its state under ``model.``) with MONAI's ``encode``/``decode``."""

    def __init__(self, config: dict):
        super().__init__()
        from diffusers import AutoencoderKL

        self.model = AutoencoderKL.from_config(config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.model.encode(x).latent_dist
        return posterior.mean, posterior.std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z).sample
