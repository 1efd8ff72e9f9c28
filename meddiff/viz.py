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


def save_panel(
    tiles: Sequence[tuple[np.ndarray, str, tuple[float, float] | None]],
    path: str | os.PathLike,
    title: str,
    columns: int = 3,
    overwrite: bool = True,
) -> Path:
    """A labelled figure: ``title`` on top, then 2D arrays (each with its caption under it and its own window,
    None for its 1st..99th percentile) in rows of ``columns``. Captions carry the numbers a reader needs."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)
    shown = [to_uint8(np.asarray(array).T, *(window or (None, None))) for array, _, window in tiles]
    side = 256  # every tile at one size, so that slices of different grids line up
    shown = [np.asarray(PILImage.fromarray(t).resize((side, round(side * t.shape[0] / t.shape[1])))) for t in shown]
    height, caption_h, title_h, gap = max(t.shape[0] for t in shown), 40, 34, 6
    columns = min(columns, len(shown))
    rows = -(-len(shown) // columns)
    canvas = PILImage.new("L", (columns * (side + gap) + gap, title_h + rows * (height + caption_h)), color=255)
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 8), title, fill=0, font=font)
    for n, (tile, (_, caption, _)) in enumerate(zip(shown, tiles, strict=True)):
        r, c = divmod(n, columns)
        x, y = gap + c * (side + gap), title_h + r * (height + caption_h)
        canvas.paste(PILImage.fromarray(tile), (x, y))
        draw.multiline_text((x, y + tile.shape[0] + 3), caption, fill=0, font=font, spacing=2)
    with atomic_path(path, overwrite=overwrite) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
