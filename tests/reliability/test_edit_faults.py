"""``meddiff edit`` under bad strengths, bad images and masks, models that cannot edit and bad options.

The promise: each is refused with one line naming what is wrong and what to do, before any sampling, and nothing
is written (neither the output nor its provenance record ``OUT.json``).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff, verb_args

from meddiff import Image
from meddiff.io import save_image

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def write_inputs(work: Path) -> None:
    """A 32x32 MR slice, one with NaN voxels, a 4D series, and masks: good, elsewhere, of another shape."""
    rng = np.random.default_rng(0)
    image = rng.random((32, 32), dtype=np.float32) * 100
    save_image(Image(image, AFFINE, "MR"), work / "img.nii.gz")
    image[3:5, 3:5] = np.nan
    nib.save(nib.Nifti1Image(image, AFFINE), work / "nan.nii.gz")  # save_image refuses NaN: written as a scanner might
    save_image(Image(rng.random((16, 16, 4, 2), dtype=np.float32), AFFINE, "MR"), work / "series.nii.gz")
    good = np.zeros((32, 32), np.float32)
    good[8:16, 8:16] = 1
    save_image(Image(good, AFFINE, "MR"), work / "good.nii.gz")
    away = AFFINE @ np.array([[1, 0, 0, 1000], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    save_image(Image(good, away, "MR"), work / "elsewhere.nii.gz")
    save_image(Image(good[:16, :16], AFFINE, "MR"), work / "small.nii.gz")


CASES = {
    "--strength 0": (["--strength", "0"], "--strength must be a number in (0, 1]"),
    "--strength -0.2": (["--strength", "-0.2"], "--strength must be a number in (0, 1]"),
    "--strength 1.5": (["--strength", "1.5"], "--strength must be a number in (0, 1]"),
    "--strength nan": (["--strength", "nan"], "--strength must be a number in (0, 1]"),
    "--strength word": (["--strength", "half"], "invalid float value"),
    "a denoising prior (mri-denoise)": (["--model", "mri-denoise"], "low noise levels only"),
    "a mask-conditioned model (mri-inpaint)": (["--model", "mri-inpaint"], "condition image"),
    "a latent model (ct-chest-2d)": (["--model", "ct-chest-2d"], "latent model"),
    "no such model": (["--model", "no-such-model"], "no model"),
    "NaN image": (["-i", "nan.nii.gz"], "NaN"),
    "4D image": (["-i", "series.nii.gz"], "4D series"),
    "mask off the grid": (["--mask", "elsewhere.nii.gz"], "does not overlap"),
    "mask of another shape": (["--mask", "small.nii.gz"], "is not the image's"),
    "masked edit with a multistep sampler": (["--mask", "good.nii.gz", "--scheduler", "dpm++2m"],
                                             "--scheduler ddpm or ddim"),
    "--steps 0": (["--steps", "0"], "--steps"),
    "--samples 0": (["--samples", "0"], "--samples"),
    "--seed -1": (["--seed", "-1"], "--seed"),
    "prompt without a text encoder": (["--prompt", "a lesion."], "takes no prompts"),
    "class label without classes": (["--class-label", "1"], "no classes"),
    "unwritable suffix": (["-o", "out.xyz"], "cannot write"),
    "output is the input": (["-o", "img.nii.gz"], "is the input"),
    "output is the mask": (["--mask", "good.nii.gz", "-o", "good.nii.gz"], "is the mask"),
}


def edit_args(model: Path, changes: list[str]) -> list[str]:
    defaults = {"-i": "img.nii.gz", "-o": "out.nii.gz", "--model": str(model), "--strength": "0.5", "--steps": "2"}
    return verb_args("edit", defaults, changes)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_written(case, tiny_model, workdir):
    changes, fragment = CASES[case]
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*edit_args(tiny_model, changes)), fragment)
    before.assert_unchanged()


def test_a_model_is_required(workdir):
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("edit", "-i", "img.nii.gz", "-o", "out.nii.gz", "--strength", "0.5"), "--model")
    before.assert_unchanged()


def test_an_existing_record_is_not_replaced(tiny_model, workdir):
    write_inputs(workdir)
    (workdir / "out.nii.gz.json").write_text("{}")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*edit_args(tiny_model, [])), "already exists")
    before.assert_unchanged()
