"""MONAI ``ControlNet`` mirroring a meddiff UNet, and the label-map encoding it is conditioned on.

A ControlNet (Zhang et al. 2023) is a trainable copy of the UNet's encoder whose outputs are added to the
frozen UNet's skip connections; MAISI conditions CT on organ label maps this way. A label map enters as the
binary digits of each voxel's label (``label_bits``: 118 structures in 7 channels, as MAISI encodes its 132
classes in 8), so every structure keeps its own code without one channel per structure.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ControlNet

# UNetConfig's further MONAI arguments that a ControlNet copies from its UNet
MONAI_OPTIONS = ("norm_eps", "resblock_updown", "transformer_num_layers", "upcast_attention", "include_fc",
                 "use_combined_linear")


def build_controlnet(unet: dict, conditioning_channels: int = 8,
                     conditioning_embedding_channels: Sequence[int] = (16,)) -> ControlNet:
    """A ControlNet for the UNet described by ``unet`` (``UNetConfig`` fields); the condition is embedded by
    ``conditioning_embedding_channels`` (each entry after the first halves it: a latent model's down-sampling)."""
    if unet.get("family") == "maisi":  # MAISI's released ControlNet
        from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi

        return ControlNetMaisi(
            spatial_dims=unet["spatial_dims"], in_channels=unet["in_channels"] + unet["concat_channels"],
            num_channels=tuple(unet["channels"]), attention_levels=tuple(unet["attention_levels"]),
            num_res_blocks=unet["num_res_blocks"], num_head_channels=unet["num_head_channels"],
            norm_num_groups=unet["norm_num_groups"], conditioning_embedding_in_channels=conditioning_channels,
            conditioning_embedding_num_channels=tuple(conditioning_embedding_channels), use_checkpointing=False,
            use_flash_attention=torch.cuda.is_available())  # MAISI's class refuses it without a GPU; same weights
    return ControlNet(
        spatial_dims=unet["spatial_dims"],
        in_channels=unet["in_channels"] + unet["concat_channels"],
        channels=tuple(unet["channels"]),
        attention_levels=tuple(unet["attention_levels"]),
        num_res_blocks=unet["num_res_blocks"],
        num_head_channels=unet["num_head_channels"],
        norm_num_groups=unet["norm_num_groups"],
        num_class_embeds=unet["num_class_embeds"],
        with_conditioning=unet["cross_attention_dim"] is not None,
        cross_attention_dim=unet["cross_attention_dim"],
        conditioning_embedding_in_channels=conditioning_channels,
        conditioning_embedding_num_channels=tuple(conditioning_embedding_channels),
        use_flash_attention=True,
        **{name: unet[name] for name in MONAI_OPTIONS if name in unet},
    )


def label_bits(labels: torch.Tensor, channels: int) -> torch.Tensor:
    """Integer labels (N, 1, *spatial) -> their binary digits (N, channels, *spatial) in {0, 1}, least
    significant first. Written here because neither MONAI nor torch has it (MAISI's bundle keeps its own)."""
    values = labels.long()
    bits = torch.arange(channels, device=labels.device).view(1, channels, *[1] * (labels.ndim - 2))
    return ((values >> bits) & 1).float()


def bits_needed(largest_label: int) -> int:
    """Channels that hold labels 0..largest_label."""
    return max(1, int(largest_label).bit_length())
