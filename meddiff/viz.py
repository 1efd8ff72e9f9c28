"""PNG figures a person would rather see than read: image grids and before/after panels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

from meddiff.files import atomic_path


def to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Window a 2D array to 0..255 (default window: its 1st..99th percentile)."""
    array = np.asarray(array, dtype=np.float32)
    if low is None or high is None:
        low, high = np.percentile(array, [1, 99])
    scaled = (array - low) / max(high - low, 1e-8)
    return (np.clip(scaled, 0, 1) * 255).round().astype(np.uint8)


def save_grid(
    images: Sequence[np.ndarray],
    path: str | os.PathLike,
    columns: int = 8,
    window: tuple[float, float] | None = None,
    overwrite: bool = True,
) -> Path:
    """Tile 2D arrays (voxel axes i, j; shown with j downwards as radiologists view a slice) into a PNG."""
    tiles = [to_uint8(np.asarray(im).T, *(window or (None, None))) for im in images]
    height = max(t.shape[0] for t in tiles)
    width = max(t.shape[1] for t in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    canvas = np.zeros((rows * (height + 2), columns * (width + 2)), dtype=np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        canvas[r * (height + 2) : r * (height + 2) + tile.shape[0],
               c * (width + 2) : c * (width + 2) + tile.shape[1]] = tile
    with atomic_path(path, overwrite=overwrite) as tmp:
        PILImage.fromarray(canvas).save(tmp, format="PNG")
    return Path(path)
