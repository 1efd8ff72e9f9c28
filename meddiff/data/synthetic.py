"""Procedural training images: dead-leaves patterns as a generic prior for edges and flat regions.

The offline MRI sources are one smooth template and a few small scans; a denoiser trained only on
them learns to smooth away the texture of other anatomies. Dead leaves (Matheron's random
occluding discs, with the scale-invariant radius law of natural images; Achddou et al. 2021 showed
denoisers trained on them transfer to real images) add sharp edges of every size and contrast
without any downloaded data. No library generates them, hence the few lines here.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy.ndimage import gaussian_filter


def dead_leaves(shape: Sequence[int], rng: np.random.RandomState | np.random.Generator, max_discs: int = 5000,
                max_blur: float = 1.5) -> np.ndarray:
    """One dead-leaves image (2D discs or 3D balls) in [0, 1].

    Radii follow p(r) ~ r^-3 between 1 pixel and a third of the image; each disc has a uniform random
    intensity and covers the discs below it. Discs are drawn top-down, each filling only pixels still
    empty, until 99.5 % of the image is covered (or ``max_discs``); what stays empty is 0, like MR background.
    A random Gaussian blur (0..``max_blur`` pixels) softens edges the way partial volume does.
    """
    shape = tuple(int(s) for s in shape)
    r_min, r_max = 1.0, max(2.0, min(shape) / 3)
    image = np.zeros(shape, dtype=np.float32)
    empty = np.ones(shape, dtype=bool)
    for drawn in range(1, max_discs + 1):
        radius = (r_min**-2 - rng.random() * (r_min**-2 - r_max**-2)) ** -0.5
        centre = rng.random(len(shape)) * np.array(shape)
        box = tuple(slice(max(0, int(c - radius)), min(s, int(c + radius) + 1))
                    for c, s in zip(centre, shape, strict=True))
        offsets = np.meshgrid(*[np.arange(b.start, b.stop) + 0.5 - c for b, c in zip(box, centre, strict=True)],
                              indexing="ij", sparse=True)
        inside = sum(o**2 for o in offsets) < radius**2
        fill = inside & empty[box]
        image[box][fill] = rng.random()
        empty[box] &= ~inside
        if drawn % 32 == 0 and empty.mean() < 0.005:  # the last specks would take thousands of tiny discs
            break
    return gaussian_filter(image, sigma=rng.uniform(0.0, max_blur))


class RandDeadLeavesd(RandomizableTransform, MapTransform):
    """With probability ``prob``, replace each key's image by a dead-leaves image of the same shape.

    Values are in the model's [-1, 1] units (-1: empty background), so the transform goes after
    intensity normalisation; the image keeps its channels (each channel its own pattern) and metadata.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, max_discs: int = 5000, max_blur: float = 1.5,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.max_discs = max_discs
        self.max_blur = max_blur

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            patterns = np.stack([dead_leaves(image.shape[1:], self.R, self.max_discs, self.max_blur)
                                 for _ in range(image.shape[0])]) * 2.0 - 1.0
            if isinstance(image, torch.Tensor):
                d[key] = image.clone().copy_(torch.from_numpy(patterns))
            else:
                d[key] = patterns.astype(image.dtype)
        return d


def rician_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``image`` plus complex Gaussian noise of std ``sigma`` per channel: MR magnitude noise."""
    real = image + sigma * rng.standard_normal(image.shape)
    imaginary = sigma * rng.standard_normal(image.shape)
    return np.hypot(real, imaginary).astype(np.float32)
