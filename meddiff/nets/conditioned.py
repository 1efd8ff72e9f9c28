"""Conditioning as network wrappers: a UNet with a ControlNet's residuals, or further per-item inputs, bound.

Each wrapper is called as the UNet is, ``(x, timesteps, context=None, class_labels=None)``, so the sampling loop and
its model functions (``meddiff.diffusion.sampling``) know only networks, whatever conditions them; a new kind of
conditioning is a new wrapper here. Conditioning tensors hold one row per item (G rows); a batch of N rows (tiles
of each item, or the two halves of a guided batch) takes each row for N / G consecutive rows (``repeat_rows``).
"""

from __future__ import annotations

import torch
from torch import nn


def repeat_rows(rows: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``rows`` (G, ...) for a batch of ``n``: each row for ``n / G`` consecutive batch rows."""
    if rows is None or rows.shape[0] == n:
        return rows
    if n % rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} conditioning rows for a batch of {n}")
    return rows.repeat_interleave(n // rows.shape[0], dim=0)


class UNetWithInputs(nn.Module):
    """A UNet whose further keyword inputs are bound, one row per item (MAISI's body region and voxel spacing)."""

    def __init__(self, unet: nn.Module, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.unet, self.inputs = unet, inputs

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        bound = {name: repeat_rows(value, x.shape[0]) for name, value in self.inputs.items()}
        return self.unet(x, timesteps=timesteps, context=context, class_labels=class_labels, **bound, **kwargs)


class ControlledUNet(nn.Module):
    """A UNet with a ControlNet (Zhang et al. 2023) on a bound condition image (G, C, *spatial): the ControlNet's
    residuals, times ``scale``, are added to the UNet's skip connections at every call."""

    def __init__(self, unet: nn.Module, controlnet: nn.Module, control: torch.Tensor, scale: float = 1.0):
        super().__init__()
        self.unet, self.controlnet, self.control, self.scale = unet, controlnet, control, scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        control = repeat_rows(self.control, x.shape[0]).to(x.dtype)
        down, middle = self.controlnet(x, timesteps, control, self.scale, context=context, class_labels=class_labels)
        return self.unet(x, timesteps=timesteps, context=context, class_labels=class_labels,
                         down_block_additional_residuals=down, mid_block_additional_residual=middle, **kwargs)


class UNetWithScalars(nn.Module):
    """A UNet conditioned on bound scalar values (G, n): as its cross-attention context (G, 1, n) and, with
    ``as_channels``, as n constant channels appended to its input (the model-zoo brain generator takes both)."""

    def __init__(self, unet: nn.Module, values: torch.Tensor, as_context: bool = True, as_channels: bool = False):
        super().__init__()
        self.unet, self.values, self.as_context, self.as_channels = unet, values, as_context, as_channels

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        values = repeat_rows(self.values, x.shape[0]).to(x.dtype)
        if self.as_channels:
            planes = values.reshape(*values.shape, *[1] * (x.ndim - 2)).expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        if self.as_context:
            context = values[:, None, :]
        return self.unet(x, timesteps=timesteps, context=context, class_labels=class_labels, **kwargs)
