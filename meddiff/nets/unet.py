"""MONAI ``DiffusionModelUNet`` from a flat, JSON-friendly config (2D or 3D by ``spatial_dims``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet

from meddiff.errors import MeddiffError


def build_unet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (32, 64, 64),
    attention_levels: Sequence[bool] = (False, False, True),
    num_res_blocks: int = 1,
    num_head_channels: int | Sequence[int] = 32,
    norm_num_groups: int = 32,
    num_class_embeds: int | None = None,
    cross_attention_dim: int | None = None,
    concat_channels: int = 0,
    scalar_channels: int = 0,
    family: str = "monai",
    include_region_inputs: bool = False,
    include_spacing_input: bool = False,
    **options,
) -> DiffusionModelUNet:
    """The denoiser backbone.

    ``num_class_embeds`` enables class conditioning (labels 0..n-1), ``cross_attention_dim`` enables a
    cross-attention context (e.g. report embeddings), and ``concat_channels`` adds input channels for
    concatenated conditions such as a mask or a noisy image, ``scalar_channels`` those of scalar conditions
    (``meddiff.nets.conditioned.UNetWithScalars``). ``options`` are MONAI's further arguments
    (``norm_eps``, ``resblock_updown``, ``transformer_num_layers``, ``upcast_attention``, ``include_fc``,
    ``use_combined_linear``: ``UNetConfig``), which published bundles set. Attention runs through torch's
    ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention``): the same weights, but no
    tokens x tokens matrix in memory, so a full-size slice does not need gigabytes for attention.
    """
    if spatial_dims not in (2, 3):
        raise MeddiffError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    if len(channels) != len(attention_levels):
        raise MeddiffError(f"channels {list(channels)} and attention_levels {list(attention_levels)} differ in length")
    if family not in ("monai", "maisi"):
        raise MeddiffError(f"unet family must be monai or maisi, not {family!r}")
    if any(c % norm_num_groups for c in channels):
        raise MeddiffError(f"every entry of channels {list(channels)} "
                           f"must be a multiple of norm_num_groups={norm_num_groups}")
    if family == "maisi":  # MAISI's released UNet: the same blocks plus body-region and spacing embeddings
        from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

        return DiffusionModelUNetMaisi(
            spatial_dims=spatial_dims, in_channels=in_channels + concat_channels, out_channels=out_channels,
            num_channels=tuple(channels), attention_levels=tuple(attention_levels), num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels, norm_num_groups=norm_num_groups, num_class_embeds=num_class_embeds,
            with_conditioning=cross_attention_dim is not None, cross_attention_dim=cross_attention_dim,
            include_top_region_index_input=include_region_inputs,
            include_bottom_region_index_input=include_region_inputs, include_spacing_input=include_spacing_input,
            use_flash_attention=torch.cuda.is_available())  # MAISI's class refuses it without a GPU; same weights
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels + concat_channels + scalar_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        attention_levels=tuple(attention_levels),
        num_res_blocks=num_res_blocks,
        num_head_channels=num_head_channels,
        norm_num_groups=norm_num_groups,
        num_class_embeds=num_class_embeds,
        with_conditioning=cross_attention_dim is not None,
        cross_attention_dim=cross_attention_dim,
        use_flash_attention=True,
        **options,
    )
