"""MONAI dict transforms: invertible normalisation, resampling inverses, slicing by anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Spacingd

from meddiff import MeddiffError, load_image
from meddiff.data.transforms import LoadImaged, NormalizeIntensityd, SliceVolumed, slice_axis


def loaded(path, modality=None):
    data = LoadImaged("image")({"image": str(path)})
    if modality:
        data["modality"] = modality
    return data


def test_normalisation_inverts_exactly_on_real_images(mni_t1, clinical_dicom, samples_dir):
    for path in (mni_t1, clinical_dicom / "693_UNCR.dcm", clinical_dicom / "RG1_UNCR.dcm",
                 samples_dir / "dipy_t1_coronal_slice.nii.gz"):
        data = loaded(path)
        original = data["image"].clone()
        norm = NormalizeIntensityd("image")
        out = norm(data)
        restored = norm.inverse(out)["image"]
        scale = float(original.abs().max())
        assert float((restored - original).abs().max()) <= 1e-4 * max(scale, 1.0), path.name


def test_normalisation_is_modality_aware(mni_t1, clinical_dicom):
    ct = NormalizeIntensityd("image", ct_window=(-1000, 1000))(loaded(clinical_dicom / "693_UNCR.dcm"))
    hu = load_image(clinical_dicom / "693_UNCR.dcm").array
    np.testing.assert_allclose(ct["image"][0].numpy(), hu / 1000.0, atol=1e-6)  # -1000 HU -> -1, +1000 HU -> +1

    mr = NormalizeIntensityd("image", percentiles=(0.5, 99.5))(loaded(mni_t1))["image"]
    brain = mr[mr > -1.0]
    assert float((brain <= 1.0).float().mean()) == pytest.approx(0.995, abs=0.003)  # robust to outliers

    clipped = NormalizeIntensityd("image", clip=True)(loaded(mni_t1))["image"]
    assert float(clipped.min()) >= -1.0 and float(clipped.max()) <= 1.0


def test_resample_then_normalise_inverts_through_compose(dipy_oblique):
    pipeline = Compose([LoadImaged("image"), Spacingd("image", pixdim=(2.0, 2.0, 2.0)), NormalizeIntensityd("image")])
    data = pipeline({"image": str(dipy_oblique), "modality": "MR"})
    assert data["image"].shape[1:] != (58, 58, 24)
    restored = pipeline.inverse(data)["image"]
    original = load_image(dipy_oblique)
    assert tuple(restored.shape[1:]) == original.array.shape
    np.testing.assert_allclose(restored.affine.numpy(), original.affine, atol=1e-4)
    error = (restored[0].numpy() - original.array)[4:-4, 4:-4, 4:-4]
    assert np.median(np.abs(error)) < 0.1 * original.array.std()  # interpolation, not identity


@pytest.mark.parametrize(("name", "axis"), [("sagittal", 0), ("coronal", 1), ("axial", 2)])
def test_slice_axis_follows_anatomy(mni_t1, name, axis):
    affine = load_image(mni_t1).affine
    assert slice_axis(affine, name) == axis
    permuted = affine[:, [2, 0, 1, 3]]  # voxel axes stored in another order
    assert slice_axis(permuted, name) == [1, 2, 0][axis]


def test_slices_skip_empty_and_keep_image_and_mask_aligned():
    volume = torch.zeros(1, 6, 7, 10)
    volume[0, 1:5, 1:6, 3:7] = torch.arange(4 * 5 * 4, dtype=torch.float32).reshape(4, 5, 4) + 1
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    affine[:3, 3] = torch.tensor([10.0, 20.0, 30.0])
    data = {"image": MetaTensor(volume, affine=affine), "mask": MetaTensor(volume > 40, affine=affine)}
    items = SliceVolumed(["image", "mask"], axis="axial", min_foreground=0.05)(data)
    assert len(items) == 4  # slices 3..6 hold the object; the other six are empty
    for offset, item in enumerate(items):
        k = 3 + offset
        assert torch.equal(item["image"].as_tensor(), volume[:, :, :, k])
        assert torch.equal(item["mask"].as_tensor(), (volume > 40)[:, :, :, k])
        world = item["image"].affine.numpy() @ np.array([2.0, 3.0, 0.0, 1.0])
        np.testing.assert_allclose(world[:3], affine.numpy()[:3] @ np.array([2.0, 3.0, k, 1.0]))
    drawn = SliceVolumed("image", axis=2, num_slices=3)
    drawn.set_random_state(0)
    assert len(drawn({"image": MetaTensor(volume, affine=affine)})) == 3


def test_slicing_an_empty_volume_is_a_clear_error():
    with pytest.raises(MeddiffError, match="no slice has enough foreground"):
        SliceVolumed("image", axis=2)({"image": MetaTensor(torch.zeros(1, 4, 4, 4))})


def test_slice_volume_any_axis_draws_all_three_planes():
    volume = MetaTensor(torch.rand(1, 6, 8, 10) + 1.0)
    drawn = SliceVolumed("image", axis="any", num_slices=1).set_random_state(0)
    shapes = {tuple(drawn({"image": volume})[0]["image"].shape) for _ in range(30)}
    assert shapes == {(1, 8, 10), (1, 6, 10), (1, 6, 8)}
    fixed = SliceVolumed("image", axis="any", num_slices=2, random=False)({"image": volume})
    assert {tuple(item["image"].shape) for item in fixed} == {(1, 6, 8)}  # axial (identity affine: the third axis)
