"""``meddiff upsample`` under inputs that have no slices to add between, bad factors and spacings, bad volumes and
models that cannot upsample.

The promise: each is refused with one line naming what is wrong and what to do, before any model loads or any
network trains, and nothing is written.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff, verb_args

from meddiff import Image
from meddiff.io import save_image

THICK = np.diag([1.0, 1.0, 4.0, 1.0])  # 1 mm in-plane, slices 4 mm apart


def write_inputs(work: Path) -> None:
    """A thick-slice MR volume (and the same naming no modality), a 2D slice, one with anisotropic in-plane voxels,
    and one with NaN voxels."""
    rng = np.random.default_rng(0)
    volume = rng.random((24, 24, 6), dtype=np.float32) * 100
    save_image(Image(volume, THICK, "MR"), work / "thick.nii.gz")
    save_image(Image(volume, THICK, None), work / "unnamed.nii.gz")  # no modality: no bundled model to pick
    save_image(Image(volume[:, :, 0], np.eye(4), "MR"), work / "slice.nii.gz")
    save_image(Image(volume, np.diag([0.7, 1.0, 4.0, 1.0]), "MR"), work / "anisotropic.nii.gz")
    volume[3:5, 3:5, 2] = np.nan
    nib.save(nib.Nifti1Image(volume, THICK), work / "nan.nii.gz")  # save_image refuses NaN: written as a scanner might


CASES = {
    "a 2D image": (["-i", "slice.nii.gz"], "3D volume"),
    "anisotropic in-plane voxels": (["-i", "anisotropic.nii.gz"], "anisotropic"),
    "NaN volume": (["-i", "nan.nii.gz"], "NaN"),
    "--factor 0.5": (["--factor", "0.5"], "--factor must be a number above 1"),
    "--factor 1": (["--factor", "1"], "--factor must be a number above 1"),
    "--factor 100": (["--factor", "100"], "at most 16"),
    "--factor nan": (["--factor", "nan"], "--factor must be a number above 1"),
    "--factor word": (["--factor", "four"], "invalid float value"),
    "--spacing coarser than the slices": (["--spacing", "8"], "not finer"),
    "--spacing 0": (["--spacing", "0"], "positive number of mm"),
    "--spacing absurdly fine": (["--spacing", "0.01"], "beyond 16"),
    "--spacing and --factor together": (["--spacing", "1", "--factor", "4"], "not allowed with argument"),
    "--thickness -1": (["--thickness", "-1"], "positive number of mm"),
    "--steps 0": (["--steps", "0"], "--steps"),
    "--self-steps 0": (["--self-steps", "0"], "--self-steps"),
    "--seed -1": (["--seed", "-1"], "--seed"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size"),
    "a denoising prior as the model": (["--model", "mri-denoise"], "not upsample"),
    "a model with --method self": (["--method", "self", "--model", "mri-denoise"], "uses no model"),
    "--method model with no model": (["-i", "unnamed.nii.gz", "--method", "model"], "needs a model"),
    "no such model": (["--model", "no-such-model"], "no model"),
    "unwritable suffix": (["-o", "out.xyz"], "cannot write"),
    "output is the input": (["-o", "thick.nii.gz"], "is the input"),
    "a series into one .dcm file": (["-o", "thin.dcm", "--method", "cubic"], "folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_written(case, workdir):
    changes, fragment = CASES[case]
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*verb_args("upsample", {"-i": "thick.nii.gz", "-o": "out.nii.gz"}, changes)),
                       fragment)
    before.assert_unchanged()


def test_a_series_whose_thickest_side_lies_within_its_slices_is_not_written_as_dicom(workdir):
    from meddiff.io.dicom_write import write_synthetic_dicom

    rng = np.random.default_rng(1)
    write_synthetic_dicom(Image(rng.random((12, 24, 24), dtype=np.float32) * 100, np.diag([4.0, 2.0, 2.0, 1.0]),
                                "MR"), workdir / "series", "test series")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("upsample", "-i", "series", "-o", "thin", "--format", "dcm", "--factor", "2",
                                   "--method", "cubic"), "within its slices")
    before.assert_unchanged()
