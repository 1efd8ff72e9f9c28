"""The LightningDataModule over a manifest: splits, 2D slices, 3D patches, masks, augmentation."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import RandFlipd

from meddiff import MeddiffError
from meddiff.data.datamodule import ManifestDataModule


def test_2d_batches_from_real_volumes(samples_dir):
    dm = ManifestDataModule(str(samples_dir / "manifest.jsonl"), spatial_dims=2, patch_size=(64, 64),
                            slices_per_volume=3, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (6, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert type(batch["image"]) is torch.Tensor  # plain tensors: no metadata overhead in training
    assert float(batch["image"].min()) > -1.1 and float(batch["image"].quantile(0.95)) <= 1.0  # robust range -> [-1, 1]
    assert dm.items("train") and all(item["modality"] == "MR" for item in dm.items("train"))
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (1, 1, 64, 64)  # the held-out 2D slice, centre-cropped
    with pytest.raises(MeddiffError, match="no 'test' records"):
        dm.test_dataloader()


def test_3d_patches_skip_2d_records(samples_dir):
    dm = ManifestDataModule(str(samples_dir / "manifest.jsonl"), spatial_dims=3, patch_size=(16, 16, 8), batch_size=2)
    dm.setup("fit")
    assert {i["image"].rsplit("/", 1)[1] for i in dm.items("val")} == set()
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 16, 16, 8)


def test_masks_follow_the_image_and_augmentation_hooks_apply(tmp_path):
    image = np.zeros((20, 20, 6), np.float32)
    image[5:15, 2:8, :] = 100.0
    for name, data in (("img", image), ("mask", (image > 0).astype(np.float32))):
        nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / f"{name}.nii.gz")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "img.nii.gz", "mask": "mask.nii.gz", "modality": "MR",
                                                  "split": "train"}) + "\n")
    flip = RandFlipd(["image", "mask"], prob=1.0, spatial_axis=1)
    dm = ManifestDataModule(str(tmp_path / "m.jsonl"), spatial_dims=2, slices_per_volume=2, batch_size=1,
                            augment=[flip])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == batch["image"].shape == (2, 1, 20, 20)
    assert torch.equal(batch["mask"] > 0.5, batch["image"] > batch["image"].min())
    assert float(batch["mask"][0, 0, 10, 15]) == 1.0 and float(batch["mask"][0, 0, 10, 3]) == 0.0  # flipped


def test_bad_configuration_is_refused(samples_dir):
    with pytest.raises(MeddiffError, match="patch_size"):
        ManifestDataModule(str(samples_dir / "manifest.jsonl"), spatial_dims=3, patch_size=(32, 32))
    with pytest.raises(MeddiffError, match="no 'train' records"):
        ManifestDataModule(str(samples_dir / "manifest.jsonl"), modalities=["CT"]).setup("fit")


def test_class_labels_and_zero_padded_masks(tmp_path):
    lines = []
    for n, finding in enumerate(["normal", "lesion", "normal"]):
        image = np.zeros((12, 12, 4), np.float32)
        image[3:9, 3:9] = 50.0 + n
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"img{n}.nii.gz")
        nib.save(nib.Nifti1Image((image > 0).astype(np.float32), np.eye(4)), tmp_path / f"mask{n}.nii.gz")
        lines.append({"image": f"img{n}.nii.gz", "mask": f"mask{n}.nii.gz", "modality": "MR", "split": "train",
                      "labels": {"finding": finding}})
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    dm = ManifestDataModule(str(tmp_path / "m.jsonl"), spatial_dims=2, patch_size=(16, 16), slices_per_volume=1,
                            batch_size=3, label_key="finding", class_names=["normal", "lesion"])
    assert [i["label"] for i in dm.items("train")] == [0, 1, 0]
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["label"].tolist()) == [0, 0, 1]
    assert float(batch["mask"].min()) == 0.0  # padding of a mask is background, not -1
    bad = ManifestDataModule(str(tmp_path / "m.jsonl"), label_key="finding", class_names=["normal"])
    with pytest.raises(MeddiffError, match="line 2: label 'lesion'"):
        bad.items("train")


def test_fewer_training_volumes_than_the_batch_size_still_train(samples_dir):
    dm = ManifestDataModule(str(samples_dir / "manifest.jsonl"), spatial_dims=2, patch_size=(32, 32),
                            slices_per_volume=2, batch_size=8)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == 1 and batches[0]["image"].shape == (4, 1, 32, 32)  # 2 volumes x 2 slices
