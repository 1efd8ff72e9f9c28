"""Random inpainting masks for training mask-conditioned models, and the condition such a model sees.

A mask-conditioned inpainting model (the BraTS "local synthesis" task) learns from healthy images with a
random region cut out: its input is [noisy image, masked image, mask]. ``RandInpaintMaskd`` draws the region
(lesion-like blobs: elastically deformed ellipsoids; boxes; brush strokes; and, given a label map, the shape of
one anatomical structure) at 1-30 % of the foreground and writes ``inpaint_condition`` = [image with the
region set to 0, mask] for ``DiffusionModule(conditioning=Conditioning(concat_key=...))``. With ``prefill``
"biharmonic" the first channel is instead the image with the region filled by biharmonic inpainting
(``prefilled``: what the classical method knows), and the model learns only the residual image - prefill, so a
network that predicts no residual gives the classical fill; ``meddiff inpaint`` builds the same condition.
Shapes are drawn by hand (numpy) and deformed with MONAI's elastic transforms: MONAI's random-erasing
transforms (``RandCoarseDropoutd``) cut boxes only and do not report what they cut.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import MapTransform, Rand2DElastic, Rand3DElastic, Randomizable
from scipy import ndimage

from meddiff.errors import MeddiffError

CONDITION_KEY = "inpaint_condition"
SHAPES = ("blob", "box", "stroke", "structure")
PREFILLS = ("biharmonic",)  # what may fill the region of a condition before the network sees it


def inpaint_condition(image: torch.Tensor, mask: torch.Tensor, channel_dim: int = 0,
                      prefill: str | None = None) -> torch.Tensor:
    """[image with the masked region set to 0 (mid-range in model units), mask] along ``channel_dim``
    (0 for one channel-first item, 1 for a batch); with ``prefill`` "biharmonic": [``prefilled(image, mask)``,
    mask], each item filled on its own."""
    mask = mask.to(image.dtype)
    if prefill is None:
        known = image * (1 - mask)
    else:  # one image channel: (1, *spatial) for an item, (N, 1, *spatial) for a batch
        spatial = image.shape[channel_dim + 1:]
        known = prefilled(image.reshape(-1, *spatial), mask.reshape(-1, *spatial) > 0.5).reshape(image.shape)
    return torch.cat([known, mask], dim=channel_dim)


def prefilled(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` (N, *spatial: 2D items) with each item's region ``mask`` (booleans, true: fill) filled by
    biharmonic inpainting (scikit-image's ``inpaint_biharmonic``): smooth, the classical baseline a residual
    model starts from. Outside the region the image is kept bit for bit; an item with an empty region comes back
    unchanged, one that is all region gets 0 (mid-range in model units: nothing is known to extend). 3D items
    are refused: the biharmonic solve over a 3D region takes seconds to minutes, too slow for training data."""
    from skimage.restoration import inpaint_biharmonic  # only models with a prefill need scikit-image

    if image.ndim != 3:
        raise MeddiffError(f"the biharmonic prefill fills 2D items (N, H, W), not shape {list(image.shape)} "
                           "— a 3D inpainting model takes prefill null")
    array = image.detach().cpu().numpy()
    region = mask.detach().cpu().numpy().astype(bool)
    out = array.copy()
    for item, (values, fill) in enumerate(zip(array, region, strict=True)):
        if fill.all():
            out[item] = 0.0
        elif fill.any():
            out[item][fill] = inpaint_biharmonic(values, fill)[fill]
    return torch.from_numpy(out).to(image.device)


def foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above 5 % of the intensity range: tissue, not the empty background at the range's bottom."""
    low, high = float(image.min()), float(image.max())
    return image > low + 0.05 * (high - low)


class RandInpaintMaskd(Randomizable, MapTransform):
    """Draw one random region per item in ``key``'s spatial shape, centred on a foreground voxel.

    ``area``: the region's size as a fraction of the foreground (drawn log-uniformly); ``shapes``: which
    kinds to draw (uniformly). ``foreground_key`` names an item entry marking where regions may be centred (a
    body mask: CT air is not "background" by intensity); without it the foreground is ``foreground(image)``.
    ``labels_key`` names an integer label map; the "structure" shape (which needs it) cuts out one connected
    region of one label, whole, when one fits the area range (else a blob). Writes ``mask_key``
    (1, *spatial) and ``CONDITION_KEY`` (2, *spatial): ``inpaint_condition`` with ``prefill`` (None or
    "biharmonic"), which must be the model's ``conditioning.prefill``.
    """

    def __init__(self, key: str = "image", mask_key: str = "inpaint_mask", shapes: Sequence[str] = SHAPES[:3],
                 area: Sequence[float] = (0.01, 0.30), foreground_key: str | None = None,
                 labels_key: str | None = None, prefill: str | None = None):
        super().__init__([key])
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown or not shapes:
            raise MeddiffError(f"inpainting mask shapes must be some of {list(SHAPES)}, not {list(shapes)}")
        if "structure" in shapes and labels_key is None:
            raise MeddiffError("the structure mask shape cuts out a labelled structure: give labels_key")
        if not 0 < area[0] <= area[1] < 1:
            raise MeddiffError(f"area must be two fractions 0 < low <= high < 1 of the foreground, not {list(area)}")
        if prefill is not None and prefill not in PREFILLS:
            raise MeddiffError(f"prefill must be one of {list(PREFILLS)} or null, not {prefill!r}")
        self.key, self.mask_key, self.shapes, self.area = key, mask_key, tuple(shapes), tuple(area)
        self.foreground_key, self.labels_key, self.prefill = foreground_key, labels_key, prefill

    def __call__(self, data):
        d = dict(data)
        image = d[self.key]
        array = _first_channel(image)
        tissue = None if self.foreground_key is None else _first_channel(d[self.foreground_key]) > 0
        labels = None if self.labels_key is None else _first_channel(d[self.labels_key])
        mask = self.draw(array, tissue, labels)
        d[self.mask_key] = torch.from_numpy(mask[None].astype(np.float32))
        d[CONDITION_KEY] = inpaint_condition(torch.as_tensor(np.asarray(image), dtype=torch.float32), d[self.mask_key],
                                             prefill=self.prefill)
        return d

    def draw(self, image: np.ndarray, tissue: np.ndarray | None = None, labels: np.ndarray | None = None) -> np.ndarray:
        """A boolean region of ``image``'s shape, centred in ``tissue`` (default ``foreground(image)``)."""
        tissue = foreground(image) if tissue is None else tissue
        points = np.argwhere(tissue) if tissue.any() else np.argwhere(np.ones_like(tissue))
        centre = points[self.R.randint(len(points))]
        low, high = self.area
        target = math.exp(self.R.uniform(math.log(low), math.log(high))) * max(int(tissue.sum()), 1)
        shape = self.shapes[self.R.randint(len(self.shapes))]
        region = self._structure(labels, tissue) if shape == "structure" else None
        if region is None:
            region = getattr(self, f"_{'blob' if shape == 'structure' else shape}")(image.shape, centre, target)
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

    def _structure(self, labels: np.ndarray, tissue: np.ndarray) -> np.ndarray | None:
        """One connected region of one label whose size fits the area range, or None when none does."""
        size = max(int(tissue.sum()), 1)
        low, high = self.area[0] * size, self.area[1] * size
        present = [v for v in np.unique(labels[tissue]) if v != 0]
        for value in self.R.permutation(present):
            parts, count = ndimage.label(labels == value)
            sizes = np.bincount(parts.ravel())[1:]
            fitting = np.flatnonzero((sizes >= low) & (sizes <= high))
            if len(fitting):
                return parts == fitting[self.R.randint(len(fitting))] + 1
        return None

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


class FieldOfViewd(MapTransform):
    """For CT in model units: ``valid`` (1 inside the scanner's field of view; outside it scanners store
    padding such as -2048 HU, which a model must never learn as anatomy: ``DiffusionModule(valid_key=...)``)
    and ``body`` (the largest connected region above ``body_above``, its holes such as the lungs filled: where
    ``RandInpaintMaskd(foreground_key="body")`` centres its regions; air is not background by intensity).
    Thresholds in model units: -1.5 and -0.5 are -1500 and -500 HU with the default window (-1000, 1000).
    """

    def __init__(self, key: str = "image", valid_key: str = "valid", body_key: str = "body",
                 outside_below: float = -1.5, body_above: float = -0.5):
        super().__init__([key])
        self.key, self.valid_key, self.body_key = key, valid_key, body_key
        self.outside_below, self.body_above = outside_below, body_above

    def __call__(self, data):
        d = dict(data)
        image = _first_channel(d[self.key])
        d[self.valid_key] = torch.from_numpy((image > self.outside_below)[None].astype(np.float32))
        body = body_mask(image, self.body_above)
        body = np.ones_like(image, bool) if body is None else body
        d[self.body_key] = torch.from_numpy(body[None].astype(np.float32))
        return d


class PaddingToAird(MapTransform):
    """For CT in model units: voxels at or below ``outside_below`` (scanner padding outside the field of view, such
    as -2048 HU) set to ``air``; every other voxel kept bit for bit. For generative recipes, before resampling and
    encoding (``ManifestDataModule(preprocess=...)``): a generator that sees padding learns it as anatomy and writes
    values below air (down to -2620 HU in the chest CT generator trained without it), while outside the field of
    view lies what lies around it, air. Defaults in model units: -1.5 and -1 are -1500 and -1000 HU with the
    default window (-1000, 1000).
    """

    def __init__(self, keys: Sequence[str] = ("image",), outside_below: float = -1.5, air: float = -1.0):
        super().__init__(keys)
        self.outside_below, self.air = outside_below, air

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key].masked_fill(d[key] <= self.outside_below, self.air)
        return d


def body_mask(image: np.ndarray, above: float) -> np.ndarray | None:
    """The largest connected region above ``above`` with its holes (the lungs) filled, or None when nothing
    is above it."""
    parts, count = ndimage.label(image > above)
    if not count:
        return None
    return ndimage.binary_fill_holes(parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1)


def _first_channel(value) -> np.ndarray:
    """Channel 0 of a channel-first item entry (tensor or array) as numpy."""
    return np.asarray(value[0].detach().cpu() if isinstance(value, torch.Tensor) else value[0])
