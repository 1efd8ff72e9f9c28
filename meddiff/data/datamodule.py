"""A LightningDataModule over a manifest: train/val/test by ``split``, MONAI transforms and caching."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    RandSpatialCropd,
    Orientationd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
    Transform,
)

from meddiff.data.manifest import Manifest
from meddiff.data.transforms import LoadImaged, NormalizeIntensityd, SliceVolumed
from meddiff.errors import MeddiffError


class ManifestDataModule(pl.LightningDataModule):
    """Images of a manifest, normalised to [-1, 1] and cut into 2D slices or 3D patches.

    ``spatial_dims=2`` cuts ``slices_per_volume`` random non-empty slices along ``slice_axis`` from
    3D volumes (2D images pass through); ``spatial_dims=3`` keeps volumes. ``spacing`` resamples
    first (mm); ``patch_size`` takes random crops for training and centred crops/pads for
    validation. In 2D, one volume gives ``slices_per_volume`` training items, so a training batch
    holds ``batch_size * slices_per_volume`` slices (MONAI's ``num_samples`` convention); 3D modules
    skip records whose ``spacing`` marks them 2D. ``augment`` is a list of MONAI dict transforms (keys ``image``/``mask``) applied to
    training items only. ``cache_rate`` keeps the deterministic part (load, resample, normalise) in
    memory, so epochs after the first skip the disk. ``label_key`` puts ``labels[label_key]`` into
    ``batch["label"]`` for class-conditioned models (strings mapped through ``class_names``). Volumes
    are reoriented to RAS first, so data from LPS DICOM and RAS NIfTI agree in layout.
    """

    def __init__(
        self,
        manifest: str,
        spatial_dims: int = 2,
        patch_size: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        slice_axis: int | str = "axial",
        slices_per_volume: int = 8,
        min_foreground: float = 0.05,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        augment: list[Transform] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_rate: float = 1.0,
        modalities: Sequence[str] | None = None,
        label_key: str | None = None,
        class_names: Sequence[str] | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MeddiffError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
        if patch_size is not None and len(patch_size) != spatial_dims:
            raise MeddiffError(f"patch_size {list(patch_size)} must have {spatial_dims} entries")
        self.save_hyperparameters(ignore=["augment"])
        self.manifest_path = Path(manifest)
        self.augment = augment or []
        self.datasets: dict[str, CacheDataset] = {}

    @cached_property
    def manifest(self) -> Manifest:
        """The manifest, read and checked once (every split draws on it)."""
        manifest = Manifest.read(self.manifest_path)
        manifest.check_files()
        return manifest

    def items(self, split: str) -> list[dict[str, Any]]:
        """Dicts of absolute paths and labels for one split."""
        manifest = self.manifest
        wanted = {m.upper() for m in self.hparams.modalities} if self.hparams.modalities else None
        items = []
        for number, record in zip(manifest.lines, manifest.records):
            if record.split != split:
                continue
            if wanted and record.modality not in wanted:
                continue
            if self.hparams.spatial_dims == 3 and record.spacing is not None and len(record.spacing) == 2:
                continue  # a 2D image cannot give 3D training items
            item = {"image": str(manifest.resolve(record.image)), "modality": record.modality, "report": record.report or ""}
            if self.hparams.label_key is not None:
                item["label"] = self.class_index(record.labels, number)
            if record.series:
                item["series"] = record.series
            if record.mask:
                item["mask"] = str(manifest.resolve(record.mask))
            items.append(item)
        return items

    def class_index(self, labels: dict, number: int) -> int:
        """``labels[label_key]`` as a class index: its position in ``class_names``, or the integer itself."""
        key, names = self.hparams.label_key, self.hparams.class_names
        if key not in labels:
            raise MeddiffError(f"{self.manifest_path} line {number}: labels has no '{key}' (needed for class conditioning)")
        value = labels[key]
        if names is not None:
            if str(value) not in names:
                raise MeddiffError(f"{self.manifest_path} line {number}: label {value!r} is not one of class_names {list(names)}")
            return list(names).index(str(value))
        if not isinstance(value, int) or value < 0:
            raise MeddiffError(f"{self.manifest_path} line {number}: label {value!r} must be a class index >= 0 or listed in class_names")
        return value

    def transforms(self, train: bool) -> Compose:
        """Load -> normalise -> resample -> slice (2D) -> crop/pad -> augment (train) -> plain tensors."""
        hp = self.hparams
        keys = ["image", "mask"]  # the mask, where a record has one, follows every spatial step
        steps: list[Transform] = [
            LoadImaged(keys, allow_missing_keys=True),
            Orientationd(keys, as_closest_canonical=True, allow_missing_keys=True),  # RAS, whatever the source
            NormalizeIntensityd("image", ct_window=hp.ct_window),
        ]
        if hp.spacing is not None:
            steps.append(Spacingd(keys, pixdim=hp.spacing, mode=("bilinear", "nearest"), allow_missing_keys=True))
        if hp.spatial_dims == 2:
            steps.append(
                SliceVolumed(keys, axis=hp.slice_axis, num_slices=hp.slices_per_volume, random=train,
                             min_foreground=hp.min_foreground, allow_missing_keys=True)
            )  # validation: the same evenly spaced slices every epoch
        if hp.patch_size is not None:
            if train:
                steps.append(RandSpatialCropd(keys, roi_size=hp.patch_size, random_size=False, allow_missing_keys=True))
            steps.append(ResizeWithPadOrCropd("image", spatial_size=hp.patch_size, constant_values=-1.0))  # -1: empty
            steps.append(ResizeWithPadOrCropd("mask", spatial_size=hp.patch_size, constant_values=0.0, allow_missing_keys=True))
        if train:
            steps.extend(self.augment)
        steps += [SelectItemsd(keys + ["modality", "label", "report"], allow_missing_keys=True), EnsureTyped(keys, track_meta=False, allow_missing_keys=True)]
        return Compose(steps)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")):
            items = self.items(split)
            if items:
                self.datasets[split] = CacheDataset(items, self.transforms(split == "train"), cache_rate=self.hparams.cache_rate, num_workers=None, progress=False)
        if "train" not in self.datasets and stage in (None, "fit"):
            raise MeddiffError(f"manifest {self.manifest_path} has no 'train' records")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise MeddiffError(f"manifest {self.manifest_path} has no '{split}' records")
        dataset = self.datasets[split]
        drop_last = shuffle and len(dataset) > self.hparams.batch_size  # never drop the only (short) batch
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; none (validation skipped) when the manifest has no usable 'val' records."""
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

