"""MONAI dictionary transforms for medical images: loading, invertible intensity normalisation, slicing.

Everything else (resampling ``Spacingd``, patches ``RandSpatialCropd``, flips, affine and intensity
augmentation) is MONAI's own and is composed with these in ``meddiff.data.datamodule``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Randomizable

from meddiff.errors import MeddiffError

# Modalities normalised like CT (window in physical units) and like radiographs (whole-image percentiles).
CT_MODALITIES = ("CT",)
XRAY_MODALITIES = ("CR", "DX", "XR", "MG", "RF")


def to_model_range(x, low: float, high: float):
    """Physical values -> model units: ``low`` -> -1, ``high`` -> +1 (arrays or tensors)."""
    return (x - low) / (high - low) * 2.0 - 1.0


def from_model_range(x, low: float, high: float):
    """Model units -> physical values; the inverse of ``to_model_range``."""
    return (x + 1.0) / 2.0 * (high - low) + low


class LoadImaged(MapTransform):
    """Read ``data[key]`` (a path) with ``meddiff.load_image`` into a channel-first MetaTensor.

    The affine (RAS+ mm) travels in the MetaTensor so MONAI's spatial transforms (Spacingd,
    Orientationd) and their inverses work; ``data["modality"]`` is filled from the file when unset.
    """

    def __init__(self, keys: KeysCollection, series_key: str = "series", modality_key: str = "modality",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.series_key = series_key
        self.modality_key = modality_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        # here, not at the top: models and pipelines import without the DICOM/ITK readers
        from meddiff.io import load_image

        d = dict(data)
        for key in self.key_iterator(d):
            series = d.get(self.series_key) if key == self.first_key(d) else None  # masks are single files
            image = load_image(d[key], series=series)
            if image.array.ndim == 4:
                raise MeddiffError(f"{d[key]} is 4D; select a volume first")
            meta = {"filename_or_obj": str(d[key]), "spatial_shape": np.array(image.array.shape)}
            affine = image.affine
            if image.array.ndim == 2:  # MONAI's 2D affines cannot hold an oblique plane: keep the spacing
                affine = np.diag([*image.spacing, 1.0, 1.0])
            d[key] = MetaTensor(torch.from_numpy(image.array[None].copy()), affine=torch.as_tensor(affine), meta=meta)
            if d.get(self.modality_key) is None and image.modality:
                d[self.modality_key] = image.modality
        return d


class NormalizeIntensityd(MapTransform, InvertibleTransform):
    """Map intensities linearly to [-1, 1] by modality, and back with ``inverse``.

    CT: the HU window ``ct_window`` maps to [-1, 1]; radiographs: the ``percentiles`` of the whole
    image; MR and others: 0 (the empty background, or the lower percentile if negative) to the upper
    percentile of the non-zero voxels, robust to bright outliers.
    Values outside are kept (``clip=False``), so the map is exactly invertible. MONAI's
    ScaleIntensityRange(Percentiles)d are not invertible, hence this transform.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality_key: str = "modality",
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        percentiles: Sequence[float] = (0.5, 99.5),
        clip: bool = False,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.modality_key = modality_key
        self.ct_window = tuple(float(v) for v in ct_window)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.clip = clip

    def intensity_range(self, image: torch.Tensor, modality: str | None) -> tuple[float, float]:
        """The (low, high) physical values that map to -1 and +1."""
        modality = (modality or "").upper()
        if modality in CT_MODALITIES:
            return self.ct_window
        values = image.detach().float().reshape(-1)
        is_mr_like = modality not in XRAY_MODALITIES
        if is_mr_like and bool((values != 0).any()):
            values = values[values != 0]
        values = values[:: max(1, values.numel() // 2_000_000)]  # quantile on a bounded sample
        low, high = torch.quantile(values, torch.tensor(self.percentiles) / 100).tolist()
        if is_mr_like:
            low = min(low, 0.0)  # MR magnitude: keep the empty background at -1
        if high <= low:
            high = low + 1.0  # constant image: map it to -1 rather than divide by zero
        return low, high

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            low, high = self.intensity_range(d[key], d.get(self.modality_key))
            out = to_model_range(d[key], low, high)
            if self.clip:
                out = out.clamp(-1.0, 1.0)
            d[key] = out
            self.push_transform(d[key], extra_info={"low": low, "high": high})
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            info = self.pop_transform(d[key])["extra_info"]
            d[key] = from_model_range(d[key], info["low"], info["high"])
        return d


def slice_axis(affine: np.ndarray, axis: int | str) -> int:
    """Voxel axis for ``axis``: an index, or 'axial' / 'coronal' / 'sagittal' resolved from the affine."""
    if isinstance(axis, int):
        return axis
    codes = nib.aff2axcodes(affine)
    wanted = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}.get(axis)
    if wanted is None:
        raise MeddiffError(f"slice axis must be 0, 1, 2, 'axial', 'coronal' or 'sagittal', not {axis!r}")
    return next(i for i, c in enumerate(codes) if c in wanted)


class SliceVolumed(MapTransform, Randomizable):
    """Cut 2D slices out of 3D channel-first volumes; returns a list of dicts, one per slice.

    Images that are already 2D pass through as a one-item list. ``axis="any"`` cuts each random draw
    along one of the three voxel axes (all planes for training), and axial slices when not random.

    ``num_slices=None`` gives every kept slice in order; an integer draws that many at random, or,
    with ``random=False``, takes that many evenly spaced kept slices (the same ones every time).
    Slices whose foreground (voxels above 10 % of the volume's intensity range) covers less than
    ``min_foreground`` of the slice are skipped, so empty air does not dominate 2D training.
    Keys are cut at the same index.
    """

    def __init__(
        self,
        keys: KeysCollection,
        axis: int | str = "axial",
        num_slices: int | None = None,
        min_foreground: float = 0.05,
        random: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.axis = axis
        self.num_slices = num_slices
        self.random = random
        self.min_foreground = min_foreground

    def kept_indices(self, volume: torch.Tensor, axis: int) -> list[int]:
        """Slices where at least ``min_foreground`` of the voxels exceed 10 % of the volume's range."""
        low, high = volume.amin(), volume.amax()
        foreground = volume[0] > low + 0.1 * (high - low)
        fraction = torch.movedim(foreground, axis, 0).reshape(volume.shape[axis + 1], -1).float().mean(dim=1)
        return [i for i, f in enumerate(fraction.tolist()) if f >= self.min_foreground]

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        first = d[self.first_key(d)]
        if first.ndim == 3:
            return [d]
        if first.ndim != 4:
            raise MeddiffError(f"SliceVolumed needs channel-first 2D or 3D images, got shape {tuple(first.shape)}")
        affine = first.affine.numpy() if isinstance(first, MetaTensor) else np.eye(4)
        if self.axis == "any":  # a random plane per call when drawing at random; axial otherwise
            axis = int(self.R.randint(3)) if self.random else slice_axis(affine, "axial")
        else:
            axis = slice_axis(affine, self.axis)
        indices = self.kept_indices(first, axis)
        if not indices:
            raise MeddiffError(f"{first.meta.get('filename_or_obj', 'volume')}: no slice has enough foreground")
        if self.num_slices is not None and self.random:
            indices = sorted(self.R.choice(indices, size=self.num_slices,
                                           replace=len(indices) < self.num_slices).tolist())
        elif self.num_slices is not None and len(indices) > self.num_slices:
            indices = [indices[i] for i in np.linspace(0, len(indices) - 1, self.num_slices).round().astype(int)]
        out = []
        for index in indices:
            item = dict(d)
            for key in self.key_iterator(d):
                item[key] = _take_slice(d[key], axis, index)
            out.append(item)
        return out


def _take_slice(volume: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    """One slice as a channel-first 2D tensor; a MetaTensor keeps a 2D-consistent affine."""
    sliced = torch.select(volume.as_tensor() if isinstance(volume, MetaTensor) else volume, axis + 1, index)
    if not isinstance(volume, MetaTensor):
        return sliced
    affine = volume.affine.clone().double()
    offset = torch.zeros(4, dtype=affine.dtype)
    offset[axis], offset[3] = float(index), 1.0
    kept = [a for a in range(3) if a != axis]
    new = torch.eye(4, dtype=affine.dtype)
    new[:3, :2] = affine[:3, kept]
    new[:3, 2] = affine[:3, axis]
    new[:, 3] = affine @ offset
    meta = {k: v for k, v in volume.meta.items() if k not in ("affine", "spatial_shape")}
    return MetaTensor(sliced.clone(), affine=new, meta={**meta, "spatial_shape": np.array(sliced.shape[1:])})
