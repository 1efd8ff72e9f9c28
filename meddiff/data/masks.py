"""Random inpainting masks for training mask-conditioned models, and the condition such a model sees.

A mask-conditioned inpainting model (the BraTS "local synthesis" task) learns from healthy images with a
random region cut out: its input is [noisy image, masked image, mask]. ``RandInpaintMaskd`` draws the region
(lesion-like blobs: elastically deformed ellipsoids; boxes; brush strokes) at 1-30 % of the foreground and
writes ``inpaint_condition`` = [image with the region set to 0, mask] for ``DiffusionModule(concat_key=...)``.
Shapes are drawn by hand (numpy) and deformed with MONAI's elastic transforms: MONAI's random-erasing
transforms (``RandCoarseDropoutd``) cut boxes only and do not report what they cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Rand2DElastic, Rand3DElastic, Randomizable

from meddiff.errors import MeddiffError

CONDITION_KEY = "inpaint_condition"
SHAPES = ("blob", "box", "stroke")


def inpaint_condition(image: torch.Tensor, mask: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """[image with the masked region set to 0 (mid-range in model units), mask] along ``channel_dim``
    (0 for one channel-first item, 1 for a batch)."""
    mask = mask.to(image.dtype)
    return torch.cat([image * (1 - mask), mask], dim=channel_dim)


def foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above 5 % of the intensity range: tissue, not the empty background at the range's bottom."""
    low, high = float(image.min()), float(image.max())
    return image > low + 0.05 * (high - low)


class RandInpaintMaskd(Randomizable, MapTransform):
    """Draw one random region per item in ``key``'s spatial shape, centred on a foreground voxel.

    ``area``: the region's size as a fraction of the foreground (drawn log-uniformly); ``shapes``: which
    kinds to draw (uniformly). Writes ``mask_key`` (1, *spatial) and ``CONDITION_KEY`` (2, *spatial).
    """

    def __init__(self, key: str = "image", mask_key: str = "inpaint_mask", shapes: Sequence[str] = SHAPES,
                 area: Sequence[float] = (0.01, 0.30)):
        super().__init__([key])
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or not shapes:
            raise MeddiffError(f"inpainting mask shapes must be some of {list(SHAPES)}, not {list(shapes)}")
        if not 0 < area[0] <= area[1] < 1:
            raise MeddiffError(f"area must be two fractions 0 < low <= high < 1 of the foreground, not {list(area)}")
        self.key, self.mask_key, self.shapes, self.area = key, mask_key, tuple(shapes), tuple(area)

    def __call__(self, data):
        d = dict(data)
        image = d[self.key]
        array = np.asarray(image[0].detach().cpu() if isinstance(image, torch.Tensor) else image[0])
        mask = self.draw(array)
        d[self.mask_key] = torch.from_numpy(mask[None].astype(np.float32))
        d[CONDITION_KEY] = inpaint_condition(torch.as_tensor(np.asarray(image), dtype=torch.float32), d[self.mask_key])
        return d

    def draw(self, image: np.ndarray) -> np.ndarray:
        """A boolean region of ``image``'s shape."""
        tissue = foreground(image)
        points = np.argwhere(tissue) if tissue.any() else np.argwhere(np.ones_like(tissue))
        centre = points[self.R.randint(len(points))]
        low, high = self.area
        target = math.exp(self.R.uniform(math.log(low), math.log(high))) * max(int(tissue.sum()), 1)
        shape = self.shapes[self.R.randint(len(self.shapes))]
        region = getattr(self, f"_{shape}")(image.shape, centre, target)
        return region if region.any() else self._box(image.shape, centre, max(target, 1.0))

    def _grid(self, shape: Sequence[int], centre: np.ndarray) -> list[np.ndarray]:
        """Offsets from ``centre`` along each axis, shaped to broadcast over ``shape``."""
        axes = enumerate(zip(shape, centre, strict=True))
        return [np.arange(n)[(...,) + (None,) * (len(shape) - 1 - a)] - c for a, (n, c) in axes]

    def _radii(self, ndim: int, target: float) -> np.ndarray:
        """Semi-axes of an ellipsoid of volume ``target``, with aspect ratios up to 2."""
        aspect = np.exp(self.R.uniform(-math.log(2) / 2, math.log(2) / 2, size=ndim))
        unit = math.pi if ndim == 2 else 4 * math.pi / 3
        scale = (target / (unit * aspect.prod())) ** (1 / ndim)
        return aspect * scale

    def _blob(self, shape, centre, target) -> np.ndarray:
        radii = self._radii(len(shape), target)
        region = sum((g / r) ** 2 for g, r in zip(self._grid(shape, centre), radii, strict=True)) <= 1.0
        radius = float(radii.mean())
        if len(shape) == 2:  # control points a radius apart, moved by up to half a radius
            elastic = Rand2DElastic((max(radius, 2.0),) * 2, (radius / 4, radius / 2), prob=1.0, mode="nearest",
                                    padding_mode="zeros")
        else:  # a smoothed random field: sigma in voxels, magnitude scales it
            elastic = Rand3DElastic((4.0, 6.0), (radius * 4, radius * 8), prob=1.0, mode="nearest",
                                    padding_mode="zeros")
        elastic.set_random_state(int(self.R.randint(2**31)))
        return np.asarray(elastic(region[None].astype(np.float32)))[0] > 0.5

    def _box(self, shape, centre, target) -> np.ndarray:
        aspect = np.exp(self.R.uniform(-math.log(2) / 2, math.log(2) / 2, size=len(shape)))
        sides = aspect * (target / aspect.prod()) ** (1 / len(shape))
        region = np.ones(shape, bool)
        for g, side in zip(self._grid(shape, centre), sides, strict=True):
            region &= np.abs(g) <= side / 2
        return region

    def _stroke(self, shape, centre, target) -> np.ndarray:
        """A brush stroke: a random walk of discs (balls in 3D) until the painted volume reaches ``target``."""
        ndim = len(shape)
        width = max(1.5, (target ** (1 / ndim)) / 4)
        region = np.zeros(shape, bool)
        point, heading = centre.astype(float), self.R.normal(size=ndim)
        grid = self._grid(shape, np.zeros(ndim))
        for _ in range(200):
            region |= sum((g - p) ** 2 for g, p in zip(grid, point, strict=True)) <= width**2
            if region.sum() >= target:
                break
            heading = heading / (np.linalg.norm(heading) + 1e-8) + 0.6 * self.R.normal(size=ndim)
            point = np.clip(point + width * heading / (np.linalg.norm(heading) + 1e-8), 0, np.array(shape) - 1)
        return region
