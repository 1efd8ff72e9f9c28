"""Random MR contrasts from one scan: the same anatomy as T2-, PD- or FLAIR-like images.

The offline MRI sources are almost all T1-weighted, so a prior learnt from them expects white matter brighter
than grey matter and dark fluid. SynthSeg (Billot et al. 2023) makes a network contrast-agnostic by drawing a
random intensity per tissue class; without label maps, a random intensity curve over the tissue does the same
for the classes the T1 separates by brightness, and keeps the scan's own texture. MONAI's
``RandHistogramShiftd`` draws monotone curves only, which cannot invert a contrast (bright fluid in T2), hence
the few lines here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform


def remap_tissue(image: np.ndarray, points: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``image`` in model units [-1, 1] through the piecewise-linear curve ``values`` at ``points`` (both on the
    [0, 1] scale, ``points`` rising from 0 to 1); the curve's 0 at 0 keeps the background dark."""
    unit = (np.clip(image, -1.0, 1.0) + 1.0) / 2.0
    return (np.interp(unit, points, values) * 2.0 - 1.0).astype(image.dtype)


class RandTissueContrastd(RandomizableTransform, MapTransform):
    """With probability ``prob``, each key's image (model units, -1 the background) through a random intensity
    curve: ``num_points`` evenly spaced control points whose values are uniform in [``low``, 1] (the first stays
    0, so air stays dark), scaled so the brightest is 1. Not monotone: fluid, grey and white matter take any
    order of brightness."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, num_points: int = 5, low: float = 0.05,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if num_points < 3 or not 0.0 <= low < 1.0:
            raise ValueError(f"num_points must be at least 3 and low in [0, 1), not {num_points} and {low}")
        self.points = np.linspace(0.0, 1.0, num_points)
        self.low = low
        self.values = np.zeros(num_points)

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if self._do_transform:
            values = self.R.uniform(self.low, 1.0, len(self.points))
            values[0] = 0.0
            self.values = values / values.max()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            array = np.asarray(d[key], dtype=np.float32)
            d[key] = torch.as_tensor(remap_tissue(array, self.points, self.values))
        return d
