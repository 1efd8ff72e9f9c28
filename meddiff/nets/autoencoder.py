"""MONAI ``AutoencoderKL`` and ``PatchDiscriminator`` from flat, JSON-friendly configs (2D or 3D).

The first stage of latent diffusion (Rombach et al. 2022; MAISI's VAE): the encoder maps an image to a
``latent_channels`` x (size / 2^(levels - 1)) latent, the diffusion model works there, the decoder maps back.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from meddiff.errors import MeddiffError


def build_autoencoder(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int = 1,
    channels: Sequence[int] = (32, 64, 64),
    latent_channels: int = 4,
    num_res_blocks: int | Sequence[int] = 1,
    attention_levels: Sequence[bool] = (False, False, False),
    norm_num_groups: int = 32,
    with_nonlocal_attn: bool = False,
    family: str = "monai",
    maisi_options: dict | None = None,
    **options,
) -> AutoencoderKL:
    """A KL-regularised autoencoder. ``with_nonlocal_attn``: the attention block in the middle of encoder and
    decoder (MONAI's default; off by default here because its tokens x tokens cost grows with the volume).
    ``options``: MONAI's further arguments (``norm_eps``, ``include_fc``, ``use_combined_linear``), which published
    bundles set; MAISI's class keeps its own defaults."""
    if spatial_dims not in (2, 3):
        raise MeddiffError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
    if len(channels) != len(attention_levels):
        raise MeddiffError(f"channels {list(channels)} and attention_levels {list(attention_levels)} differ in length")
    if any(c % norm_num_groups for c in channels):
        raise MeddiffError(f"every entry of channels {list(channels)} "
                           f"must be a multiple of norm_num_groups={norm_num_groups}")
    if family == "maisi":  # MAISI's released VAE: AutoencoderKL's layout, split convolutions to save memory
        from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi

        blocks = [num_res_blocks] * len(channels) if isinstance(num_res_blocks, int) else list(num_res_blocks)
        return AutoencoderKlMaisi(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, num_res_blocks=blocks,
            num_channels=tuple(channels), attention_levels=tuple(attention_levels), latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, with_encoder_nonlocal_attn=with_nonlocal_attn,
            with_decoder_nonlocal_attn=with_nonlocal_attn, **(maisi_options or {}))
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        latent_channels=latent_channels,
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention_levels),
        norm_num_groups=norm_num_groups,
        with_encoder_nonlocal_attn=with_nonlocal_attn,
        with_decoder_nonlocal_attn=with_nonlocal_attn,
        use_flash_attention=True,
        **options,
    )


def build_discriminator(spatial_dims: int = 2, channels: int = 32, num_layers: int = 3,
                        in_channels: int = 1) -> PatchDiscriminator:
    """The patch discriminator of the autoencoder's adversarial term (MONAI's tutorials and MAISI)."""
    return PatchDiscriminator(spatial_dims=spatial_dims, channels=channels, in_channels=in_channels,
                              num_layers_d=num_layers, out_channels=1)
