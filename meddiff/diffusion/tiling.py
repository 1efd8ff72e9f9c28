"""Tiles: a model function evaluated on overlapping windows blended with Gaussian weights (MONAI's
sliding-window inference), so memory stays flat in the image size and a network sees the sizes it learnt."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from meddiff.diffusion.sampling import ModelFunction

OVERLAP = 0.25  # a quarter of a side, MONAI's sliding-window default


def tile_geometry(spatial: Sequence[int], tile: Sequence[int], multiple: int) -> tuple[list[int], list[int], int]:
    """(padded shape, tile, tiles per image) for an image of shape ``spatial``.

    Sides are padded up to a ``multiple`` (what a UNet's levels can halve); the tile shrinks to the padded
    image where that is smaller. The count repeats MONAI's window scan (``_get_scan_interval``, private) so
    a progress bar knows its total.
    """
    padded = [-(-int(s) // multiple) * multiple for s in spatial]
    roi = [min(-(-int(t) // multiple) * multiple, p) for t, p in zip(tile, padded, strict=True)]
    count = 1
    for p, r in zip(padded, roi, strict=True):
        interval = r if r == p else max(int(r * (1 - OVERLAP)), 1)
        count *= -(-(p - r) // interval) + 1
    return padded, roi, count


def pad_to(x: torch.Tensor, padded: Sequence[int]) -> torch.Tensor:
    """Pad (B, C, *spatial) at the end of each side up to ``padded``; reflect where the side allows it."""
    spatial = x.shape[2:]
    for dim, (size, target) in enumerate(zip(spatial, padded, strict=True)):
        if target > size:
            pad = [0] * (2 * len(spatial))
            pad[2 * (len(spatial) - 1 - dim) + 1] = target - size
            x = torch.nn.functional.pad(x, pad, mode="reflect" if target - size < size else "replicate")
    return x


def tiled(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: Sequence[int], multiple: int,
          batch_size: int, on_tiles: Callable[[int], None] | None = None) -> torch.Tensor:
    """``run`` over (B, C, *spatial) ``x`` on blended tiles, ``batch_size`` tiles per call; the same shape out.
    ``on_tiles(n)`` is told after each call how many tiles it took (a progress bar)."""
    spatial = list(x.shape[2:])
    padded, roi, _ = tile_geometry(spatial, tile, multiple)

    def counted(tiles: torch.Tensor) -> torch.Tensor:
        out = run(tiles)
        if on_tiles is not None:
            on_tiles(tiles.shape[0])
        return out

    out = sliding_window_inference(pad_to(x, padded), roi, batch_size, counted, overlap=OVERLAP, mode="gaussian")
    return out[(slice(None), slice(None), *[slice(0, s) for s in spatial])]


def tiled_function(model: ModelFunction, tile: Sequence[int], multiple: int, batch_size: int) -> ModelFunction:
    """``model`` evaluated tile by tile at every step: for images larger than the network's training shape.
    Channels a network takes with the image go on outside: ``sampling.concatenated(tiled_function(...), c)``
    tiles them with the image, so each tile carries its own part."""
    return lambda x, t: tiled(lambda tiles: model(tiles, t), x, tile, multiple, batch_size)
