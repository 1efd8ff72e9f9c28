"""The demo's labelled panels: a title, every tile at one width, a caption under each."""

from __future__ import annotations

import numpy as np
from PIL import Image as PILImage

from meddiff.viz import save_panel


def test_a_panel_has_its_title_tiles_and_captions_where_they_belong(tmp_path):
    square, wide = np.ones((64, 64), np.float32), np.ones((128, 64), np.float32)  # (i, j): wide is 128 columns
    path = save_panel([(square, "first\nPSNR 30.0 dB", (0.0, 1.0)), (wide, "second", (0.0, 1.0)),
                       (square, "third", None)], tmp_path / "panel.png", "A title", columns=2)
    panel = np.asarray(PILImage.open(path))
    tile_top, tile_height, caption_height = 34, 256, 40  # every tile 256 wide; the square one 256 high
    assert panel.shape == (tile_top + 2 * (tile_height + caption_height), 2 * (256 + 6) + 6)
    assert (panel[:tile_top] < 128).any()  # the title is written
    assert (panel[tile_top:tile_top + 128, 6:262] == 255).all()  # a tile windowed (0, 1): ones are white
    under = panel[tile_top + tile_height:tile_top + tile_height + caption_height, 6:262]
    assert (under < 128).any()  # the caption under the first tile
    assert not (panel[tile_top + tile_height + caption_height:, 6 + 256 + 6:] < 255).any()  # no fourth tile
