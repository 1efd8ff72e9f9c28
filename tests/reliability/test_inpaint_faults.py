"""``meddiff inpaint`` under bad images, bad masks, models that cannot repaint and bad options.

The promise: each is refused with one line naming what is wrong and what to do, before any sampling,
and nothing is written (an existing output is never replaced without --overwrite).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff, tiny_model_dir, verb_args

from meddiff import Image
from meddiff.io import save_image

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def write_inputs(work: Path) -> None:
    """A 32x32 MR slice, a 4D series, and masks: good, empty, full, soft, labels, small, elsewhere, 3D."""
    rng = np.random.default_rng(0)
    save_image(Image(rng.random((32, 32), dtype=np.float32) * 100, AFFINE, "MR"), work / "img.nii.gz")
    save_image(Image(rng.random((16, 16, 4, 2), dtype=np.float32), AFFINE, "MR"), work / "series.nii.gz")
    good = np.zeros((32, 32), np.float32)
    good[8:16, 8:16] = 1
    masks = {
        "good": (good, AFFINE),
        "empty": (good * 0, AFFINE),
        "full": (good * 0 + 1, AFFINE),
        "soft": (good * np.linspace(0.1, 1, 32), AFFINE),
        "labels": (good * 1 + (good == 0) * 2, AFFINE),
        "small": (good[:16, :16], AFFINE),
        "elsewhere": (good, AFFINE @ np.array([[1, 0, 0, 1000], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])),
    }
    for name, (array, affine) in masks.items():
        save_image(Image(array, affine, "MR"), work / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def prior(tmp_path_factory) -> Path:
    """A denoising prior (trained on low noise levels only): it cannot start from pure noise."""
    return tiny_model_dir(tmp_path_factory.mktemp("prior") / "model", max_train_timestep=100)


CASES = {
    "missing image": (["-i", "nothing.nii.gz"], "does not exist"),
    "missing mask": (["--mask", "nothing.nii.gz"], "does not exist"),
    "4D image": (["-i", "series.nii.gz"], "4D series"),
    "empty mask": (["--mask", "empty.nii.gz"], "mask is empty"),
    "all-ones mask": (["--mask", "full.nii.gz"], "covers the whole image"),
    "probability map": (["--mask", "soft.nii.gz"], "not binary"),
    "label map": (["--mask", "labels.nii.gz"], "not binary"),
    "mask of another shape": (["--mask", "small.nii.gz"],
                              "(16 x 16 voxels of 2 x 2 mm, origin (0, 0, 0) mm, RA) is not the image's (32 x 32"),
    "mask elsewhere": (["--mask", "elsewhere.nii.gz"], "does not overlap"),
    "multistep scheduler": (["--scheduler", "dpm++2m"], "multistep"),
    "unknown scheduler": (["--scheduler", "magic"], "unknown scheduler"),
    "--steps 0": (["--steps", "0"], "--steps"),
    "--resample 0": (["--resample", "0"], "--resample"),
    "--jump 0": (["--jump", "0"], "--jump"),
    "--samples 0": (["--samples", "0"], "--samples"),
    "--seed -1": (["--seed", "-1"], "--seed"),
    "prompt without a text encoder": (["--prompt", "no lesion."], "takes no prompts"),
    "guidance without a text encoder": (["--guidance-scale", "3"], "no text encoder"),
    "class label without classes": (["--class-label", "1"], "no classes"),
    "unwritable suffix": (["-o", "out.xyz"], "cannot write"),
    "output exists": (["-o", "series.nii.gz"], "already exists"),
    "output is the input": (["-o", "img.nii.gz"], "is the input"),
    "output is the mask": (["-o", "good.nii.gz"], "is the mask"),
    "no such model": (["--model", "no-such-model"], "no model"),
}


def inpaint_args(model: Path, changes: list[str]) -> list[str]:
    defaults = {"-i": "img.nii.gz", "--mask": "good.nii.gz", "-o": "out.nii.gz", "--model": str(model), "--steps": "2"}
    return verb_args("inpaint", defaults, changes)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_written(case, tiny_model, workdir):
    changes, fragment = CASES[case]
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*inpaint_args(tiny_model, changes)), fragment)
    before.assert_unchanged()


def test_a_denoising_prior_is_refused(prior, workdir):
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*inpaint_args(prior, [])), "low noise levels only", "cannot generate, inpaint")
    before.assert_unchanged()


def test_a_3d_model_refuses_a_slice(tmp_path, workdir):
    write_inputs(workdir)
    model = tiny_model_dir(tmp_path / "model3d", spatial_dims=3)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*inpaint_args(model, [])), "3D model inpaints volumes")
    before.assert_unchanged()
