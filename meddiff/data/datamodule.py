"""A LightningDataModule over a manifest: train/val/test by ``split``, MONAI transforms and caching."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    Compose,
    EnsureTyped,
    Orientationd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    SelectItemsd,
    Spacingd,
    Transform,
)
from torch.utils.data import Dataset, DistributedSampler

from meddiff.data.latents import LATENT_KEY, EncodeLatentd
from meddiff.data.manifest import Manifest
from meddiff.data.masks import CONDITION_KEY
from meddiff.data.transforms import LoadImaged, NormalizeIntensityd, SliceVolumed
from meddiff.errors import MeddiffError


class ManifestDataModule(pl.LightningDataModule):
    """Images of a manifest, normalised to [-1, 1] and cut into 2D slices or 3D patches.

    ``spatial_dims=2`` cuts ``slices_per_volume`` random non-empty slices along ``slice_axis`` from
    3D volumes (2D images pass through); ``spatial_dims=3`` keeps volumes. ``spacing`` resamples
    first (mm); ``patch_size`` takes random crops for training and centred crops/pads for
    validation. In 2D, one volume gives ``slices_per_volume`` training items, so a training batch
    holds ``batch_size * slices_per_volume`` slices (MONAI's ``num_samples`` convention); 3D modules
    skip records whose ``spacing`` marks them 2D. ``preprocess`` is a list of deterministic dict transforms
    applied to every item right after intensity normalisation (model units; before resampling, latent encoding
    and slicing; kept in the cache): what every network trained on the data must see, e.g.
    ``meddiff.data.masks.PaddingToAird``. ``augment`` is a list of MONAI dict transforms
    (keys ``image``/``mask``) applied to training items only; ``conditions`` are dict transforms applied to
    training and validation items after it, making what a conditioned network sees besides the image
    (``meddiff.data.masks.RandInpaintMaskd``: random masks and ``inpaint_condition``). ``cache_rate``
    keeps the deterministic part (load, resample, normalise) in memory, so epochs after the first skip
    the disk.
    ``label_key`` puts ``labels[label_key]`` into ``batch["label"]`` for class-conditioned models
    (strings mapped through ``class_names``). Volumes are reoriented to RAS first, so data from LPS
    DICOM and RAS NIfTI agree in layout.
    Training data replay exactly on resume: the order of an epoch is a function of (``data_seed``, epoch)
    only, the random transforms of an item (slices, crops, augmentation) are seeded by (``data_seed``,
    epoch, index), and the training loader tells Lightning how far into its epoch it got, so a run
    resumed from any step checkpoint sees the batches an uninterrupted run would. ``data_seed`` defaults
    to the run's ``seed_everything`` (resume with the same seed, as the same config gives).
    ``latents`` (an autoencoder folder: the ``autoencoder`` of the latent model being trained) caches latents:
    each volume is encoded once, after resampling (``meddiff.data.latents``), and slices and crops are drawn in
    latent space (``patch_size`` stays in image voxels); it takes no ``augment`` and no ``slice_axis`` "any".
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
        preprocess: list[Transform] | None = None,
        augment: list[Transform] | None = None,
        conditions: list[Transform] | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_rate: float = 1.0,
        modalities: Sequence[str] | None = None,
        label_key: str | None = None,
        class_names: Sequence[str] | None = None,
        data_seed: int | None = None,
        latents: str | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MeddiffError(f"spatial_dims must be 2 or 3, not {spatial_dims}")
        if patch_size is not None and len(patch_size) != spatial_dims:
            raise MeddiffError(f"patch_size {list(patch_size)} must have {spatial_dims} entries")
        if latents is not None and (augment or slice_axis == "any"):
            raise MeddiffError("cached latents (latents) take no augment and no slice_axis 'any': "
                               "images are encoded once, before any random step")
        self.save_hyperparameters(ignore=["preprocess", "augment", "conditions"])
        self.manifest_path = Path(manifest)
        self.preprocess = preprocess or []
        self.augment = augment or []
        self.conditions = conditions or []
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
        for number, record in zip(manifest.lines, manifest.records, strict=True):
            if record.split != split:
                continue
            if wanted and record.modality not in wanted:
                continue
            if self.hparams.spatial_dims == 3 and record.spacing is not None and len(record.spacing) == 2:
                continue  # a 2D image cannot give 3D training items
            item = {"image": str(manifest.resolve(record.image)), "modality": record.modality,
                    "report": record.report or ""}
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
            raise MeddiffError(f"{self.manifest_path} line {number}: "
                               f"labels has no '{key}' (needed for class conditioning)")
        value = labels[key]
        if names is not None:
            if str(value) not in names:
                raise MeddiffError(f"{self.manifest_path} line {number}: "
                                   f"label {value!r} is not one of class_names {list(names)}")
            return list(names).index(str(value))
        if not isinstance(value, int) or value < 0:
            raise MeddiffError(f"{self.manifest_path} line {number}: "
                               f"label {value!r} must be a class index >= 0 or listed in class_names")
        return value

    def transforms(self, train: bool) -> Compose:
        """Load -> normalise -> preprocess -> resample -> slice (2D) -> crop/pad -> augment (train) -> plain tensors."""
        hp = self.hparams
        keys = ["image", "mask"]  # the mask, where a record has one, follows every spatial step
        steps: list[Transform] = [
            NamedLoadImaged(keys, allow_missing_keys=True),
            Orientationd(keys, as_closest_canonical=True, allow_missing_keys=True),  # RAS, whatever the source
            NormalizeIntensityd("image", ct_window=hp.ct_window),
            *self.preprocess,
        ]
        if hp.spacing is not None:
            steps.append(Spacingd(keys, pixdim=hp.spacing, mode=("bilinear", "nearest"), allow_missing_keys=True))
        patch_size, min_foreground = hp.patch_size, hp.min_foreground
        if hp.latents is not None:
            steps.append(self.encoder)
            patch_size = self.latent_patch_size
            min_foreground = 0.0  # the encoder kept only slices with enough foreground
        if hp.spatial_dims == 2:
            steps.append(
                SliceVolumed(keys, axis=hp.slice_axis, num_slices=hp.slices_per_volume, random=train,
                             min_foreground=min_foreground, allow_missing_keys=True)
            )  # validation: the same evenly spaced slices every epoch
        if patch_size is not None:
            if train:
                steps.append(RandSpatialCropd(keys, roi_size=patch_size, random_size=False, allow_missing_keys=True))
            steps.append(ResizeWithPadOrCropd("image", spatial_size=patch_size, constant_values=-1.0))  # -1: empty
            steps.append(ResizeWithPadOrCropd("mask", spatial_size=patch_size, constant_values=0.0,
                                              allow_missing_keys=True))
        if train:
            steps.extend(self.augment)
        # what the network sees besides the image (e.g. inpainting masks), for training and validation alike
        steps.extend(self.conditions)
        steps += [SelectItemsd(keys + ["modality", "label", "report", "valid", CONDITION_KEY, LATENT_KEY],
                               allow_missing_keys=True),
                  EnsureTyped(keys, track_meta=False, allow_missing_keys=True)]
        return Compose(steps)

    @cached_property
    def encoder(self) -> EncodeLatentd:
        """The first stage that encodes each volume once (``latents``)."""
        hp = self.hparams
        encoder = EncodeLatentd(hp.latents, axis=hp.slice_axis, min_foreground=hp.min_foreground,
                                min_size=hp.patch_size)
        if encoder.spatial_dims != hp.spatial_dims:
            raise MeddiffError(f"the autoencoder in {hp.latents} is {encoder.spatial_dims}D; this data module makes "
                               f"{hp.spatial_dims}D items")
        return encoder

    @property
    def latent_patch_size(self) -> list[int] | None:
        """``patch_size`` on the latent grid."""
        if self.hparams.patch_size is None:
            return None
        factor = self.encoder.factor
        if any(side % factor for side in self.hparams.patch_size):
            raise MeddiffError(f"patch_size {list(self.hparams.patch_size)} is not a multiple of the autoencoder's "
                               f"down-sampling {factor} (latents {self.hparams.latents})")
        return [side // factor for side in self.hparams.patch_size]

    def reports(self, split: str) -> list[str]:
        """The distinct non-empty reports of a split, in manifest order (fixed prompts for sample grids)."""
        return list(dict.fromkeys(item["report"] for item in self.items(split) if item["report"]))

    def setup(self, stage: str | None = None) -> None:
        """Read, check and cache the splits of ``stage``; splits already set up are kept (``meddiff fit``
        sets up before the Trainer starts its loggers, so bad data fails before any run folder exists)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in splits.get(stage, ("train", "val", "test")):
            if split in self.datasets:
                continue
            items = self.items(split)
            if items:
                self.datasets[split] = CacheDataset(items, self.transforms(split == "train"),
                                                    cache_rate=self.hparams.cache_rate, num_workers=None,
                                                    progress=False)
        if "train" not in self.datasets and stage in (None, "fit"):
            raise MeddiffError(f"manifest {self.manifest_path} has no 'train' records")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise MeddiffError(f"manifest {self.manifest_path} has no '{split}' records")
        dataset = self.datasets[split]
        drop_last = shuffle and len(dataset) > self.hparams.batch_size  # never drop the only (short) batch
        if not shuffle:
            return DataLoader(dataset, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)
        seed = (self.hparams.data_seed if self.hparams.data_seed is not None
                else int(os.environ.get("PL_GLOBAL_SEED", "0")))
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(dataset, seed=seed, num_replicas=world, rank=rank)
        return ResumableDataLoader(
            EpochSeededDataset(dataset, seed), batch_size=self.hparams.batch_size, sampler=sampler,
            num_workers=self.hparams.num_workers, drop_last=drop_last
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; none (validation skipped) when the manifest has no usable 'val' records."""
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)



class NamedLoadImaged(LoadImaged):
    """LoadImaged whose errors name the file (a NaN voxel, say): MONAI's wrapper names only the transform."""

    def __call__(self, data):
        try:
            return super().__call__(data)
        except MeddiffError as exc:
            names = [str(data[key]) for key in self.key_iterator(dict(data))]
            if any(name in str(exc) for name in names):
                raise
            raise MeddiffError(f"{', '.join(names)}: {exc}") from None


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (the order of an epoch is a permutation seeded by seed + epoch, this
    rank's share of it), yielding ``(epoch, index)`` so that the dataset can seed an item's random
    transforms by its epoch too. ``start`` skips the first items of the next epoch (a resume).

    Being a DistributedSampler, Lightning keeps it under DDP (its rank and world size are set from the
    trainer) and calls ``set_epoch`` before each epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter([(self.epoch, index) for index in indices])


class EpochSeededDataset(Dataset):
    """Item ``(epoch, index)`` of a CacheDataset, its random transforms seeded by (seed, epoch, index).

    MONAI seeds random transforms once per loader (or worker) and lets their state run on, so a
    resumed run would crop differently; seeding per item makes an item a function of its key alone,
    with or without worker processes. Written here because MONAI has no per-item seeding.
    """

    def __init__(self, dataset: CacheDataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        item_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        self.dataset.transform.set_random_state(seed=item_seed)
        return self.dataset[index]


class ResumableDataLoader(DataLoader):
    """A training loader with Lightning's ``state_dict``/``load_state_dict`` protocol: it records the
    epoch and how many batches of it were handed out, and a loaded state makes the next iteration of
    that epoch start after them (Lightning restarts a plain loader's epoch from its first batch).

    Lightning does not prefetch from a loader whose length is known, so "handed out" is "trained on"
    when a checkpoint is written. Written here because torchdata's StatefulDataLoader is not a
    dependency and MONAI's DataLoader (collation of multi-sample transforms) is wanted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done = 0
        self.resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume = (int(state["epoch"]), int(state["batches"]))

    def __iter__(self):
        done = self.resume[1] if self.resume is not None and self.resume[0] == self.sampler.epoch else 0
        self.resume = None
        self.sampler.start = done * self.batch_size
        self.batches_done = done
        for batch in super().__iter__():
            self.batches_done += 1
            yield batch
