"""Clinical data safety of every verb that writes DICOM or a processed scan: no folder of the user's deleted, no input
replaced, no two runs mixed into one series, no patient relabelled, no value silently lost, no unbounded option."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff
from pydicom.data import get_testdata_file

from meddiff import Image
from meddiff.io import load_image, save_image
from meddiff.io.dicom_write import write_synthetic_dicom

MR_SMALL = get_testdata_file("MR_small.dcm")


def series(folder: Path, modality: str = "CT", patient: str = "PAT-A", values: np.ndarray | None = None) -> Path:
    """A 3-slice DICOM series of one patient (a synthetic series with the patient set, as a scanner's would be)."""
    rng = np.random.default_rng(0)
    if values is None:
        values = rng.integers(-1000, 1500, (16, 16, 3)).astype(np.float32) if modality == "CT" else \
            rng.integers(0, 800, (16, 16, 3)).astype(np.float32)
    write_synthetic_dicom(Image(values, np.diag([1.0, 1.0, 2.0, 1.0]), modality), folder, "source")
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName = patient, f"{patient}^Test"
        ds.save_as(path)
    return folder


def same_scan_nifti(source: Path, out: Path, values: np.ndarray | None = None) -> Path:
    image = load_image(source)
    if values is not None:
        image = Image(values.astype(np.float32), image.affine, image.modality)
    return save_image(image, out)


# 1. Never delete what meddiff did not write


def test_overwrite_refuses_a_series_folder_holding_the_users_files(workdir):
    source = series(workdir / "ct")
    out = workdir / "out"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("four years of work")
    (out / "sub" / "data.csv").write_text("a,b\n")
    before = Snapshot(workdir)
    error = assert_clean_error(run_meddiff("convert", source, out, "--format", "dcm", "--overwrite"),
                               "did not write", "sub", "thesis.txt")
    assert "move those files" in error
    before.assert_unchanged()


def test_overwrite_replaces_meddiffs_own_series_only(workdir):
    source = series(workdir / "ct")
    out = workdir / "out"
    assert run_meddiff("convert", source, out, "--format", "dcm").code == 0
    first = {p.name: pydicom.dcmread(p).SeriesInstanceUID for p in out.glob("*.dcm")}
    assert run_meddiff("convert", source, out, "--format", "dcm", "--overwrite").code == 0
    second = {p.name: pydicom.dcmread(p).SeriesInstanceUID for p in out.glob("*.dcm")}
    assert first.keys() == second.keys() and len(set(second.values())) == 1
    assert set(first.values()).isdisjoint(second.values())  # a new series, none of the old files left beside it
    (out / "notes.txt").write_text("mine")
    assert_clean_error(run_meddiff("convert", source, out, "--format", "dcm", "--overwrite"), "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_a_shorter_series_over_a_longer_one_leaves_no_stale_slice(tmp_path):
    from meddiff.outputs import commit_series, series_record, staged_series

    out = tmp_path / "out"
    write_synthetic_dicom(Image(np.zeros((8, 8, 4)), np.eye(4), "MR"), out, "long")
    assert len(series_record(out)["files"]) == 4
    short = write_synthetic_dicom(Image(np.ones((8, 8, 2)), np.eye(4), "MR"), tmp_path / "short", "short")
    with staged_series(out, overwrite=True) as stage:
        for path in short.glob("*.dcm"):
            shutil.copy(path, stage / path.name)
        commit_series(stage, out, str(pydicom.dcmread(next(short.glob("*.dcm"))).SeriesInstanceUID), True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["slice_0000.dcm", "slice_0001.dcm"]
    assert series_record(out)["files"] == ["slice_0000.dcm", "slice_0001.dcm"]


# 2. Inputs are sacred


def test_an_output_that_is_the_input_is_refused_before_work(workdir):
    source = series(workdir / "ct")
    nifti = same_scan_nifti(source, workdir / "x.nii.gz")
    cases = [
        (("convert", source, source, "--format", "dcm", "--overwrite"), "is the input"),
        (("convert", source, source / "derived", "--format", "dcm"), "inside the input"),
        (("convert", nifti, nifti, "--overwrite"), "is the input"),
        (("convert", nifti, workdir, "--format", "dcm", "--overwrite"), "contains the input"),
        (("convert", nifti, source, "--format", "dcm", "--template", source, "--overwrite"), "is the template"),
        (("denoise", "-i", MR_SMALL, "-o", Path(MR_SMALL).parent / "derived", "--format", "dcm"), "two series"),
    ]
    os.symlink(source, workdir / "link")
    cases.append((("convert", source, workdir / "link", "--format", "dcm", "--overwrite"), "is the input"))
    before = Snapshot(workdir)
    for argv, fragment in cases:
        assert_clean_error(run_meddiff(*argv), fragment)
    before.assert_unchanged()


# 3. One writer per output


def test_a_second_writer_of_one_output_is_refused_at_once(workdir):
    from filelock import FileLock

    source = series(workdir / "ct")
    out = workdir / "out"
    with FileLock(workdir / ".out.meddiff-lock", timeout=0):  # another run holds the output
        before = Snapshot(workdir)
        assert_clean_error(run_meddiff("convert", source, out, "--format", "dcm"), "another meddiff run", "out")
        before.assert_unchanged(allowed=(".out.meddiff-lock",))
    assert not out.exists()


def test_each_run_stages_under_its_own_name_and_clears_a_killed_runs_stage(tmp_path):
    from meddiff.outputs import staged_series

    out = tmp_path / "out"
    stale = tmp_path / ".out.meddiff-tmp-deadbeef.partial"
    stale.mkdir()
    (stale / "slice_0000.dcm").write_bytes(b"half")
    with staged_series(out, overwrite=False) as first:
        assert not stale.exists() and first.parent == tmp_path and first.name.startswith(".out.meddiff-tmp-")
    with staged_series(out, overwrite=False) as second:
        assert second != first


def test_a_folder_filled_by_something_else_is_never_reported_as_written(tmp_path):
    from meddiff.errors import MeddiffError
    from meddiff.outputs import verify_series

    out = write_synthetic_dicom(Image(np.zeros((8, 8, 3)), np.eye(4), "MR"), tmp_path / "out", "ours")
    uid = str(pydicom.dcmread(out / "slice_0000.dcm").SeriesInstanceUID)
    files = ["slice_0000.dcm", "slice_0001.dcm", "slice_0002.dcm"]
    verify_series(out, uid, files)
    other = write_synthetic_dicom(Image(np.zeros((8, 8)), np.eye(4), "MR"), tmp_path / "other.dcm", "theirs")
    shutil.copy(other, out / "slice_0001.dcm")  # a second writer's slice in place of ours
    with pytest.raises(MeddiffError, match="another series"):
        verify_series(out, uid, files)
    (out / "slice_0003.dcm").write_bytes(b"")
    with pytest.raises(MeddiffError, match="4 files instead of 3"):
        verify_series(out, uid, files)


# 4. Patient, study, frame and modality consistency


def test_a_template_of_another_patient_is_refused_naming_both(workdir):
    ours, theirs = series(workdir / "a", patient="PAT-A"), series(workdir / "b", patient="PAT-B")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("convert", ours, workdir / "out", "--format", "dcm", "--template", theirs),
                       "PatientID 'PAT-A' vs 'PAT-B'", "--allow-other-patient")
    before.assert_unchanged()
    out = workdir / "allowed"
    assert run_meddiff("convert", ours, out, "--format", "dcm", "--template", theirs, "--allow-other-patient").code == 0
    derived = pydicom.dcmread(next(out.glob("*.dcm")))
    assert "--allow-other-patient" in derived.DerivationDescription and "PatientID" in derived.DerivationDescription


def test_a_seg_mask_of_another_patient_is_refused_for_inpainting(workdir, tiny_model):
    image, other = series(workdir / "a", patient="PAT-A"), series(workdir / "b", patient="PAT-B")
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[4:8, 4:8, 1] = 1
    save_image(Image(mask, load_image(other).affine), workdir / "mask.nii.gz")
    assert run_meddiff("convert", workdir / "mask.nii.gz", workdir / "seg.dcm", "--format", "seg",
                       "--template", other).code == 0
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("inpaint", "-i", image, "--mask", workdir / "seg.dcm", "-o", workdir / "f.nii.gz",
                                   "--model", tiny_model), "PAT-A", "PAT-B")
    before.assert_unchanged()


def test_modalities_that_contradict_each_other_are_refused(workdir):
    ct, mr = series(workdir / "ct", "CT"), series(workdir / "mr", "MR")
    ct_nifti = same_scan_nifti(ct, workdir / "ct.nii.gz")
    before = Snapshot(workdir)
    # CT values in HU written as MR Image Storage
    assert_clean_error(run_meddiff("convert", ct_nifti, workdir / "o1", "--format", "dcm", "--template", mr,
                                   "--allow-other-patient"), "is CT", "MR")
    # a CT series through the MR-only denoiser
    assert_clean_error(run_meddiff("denoise", "-i", ct, "-o", workdir / "o2.nii.gz"), "is CT", "trained on MR")
    # an MR scan called CT to reach the CT inpainting model
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 20:30] = 1
    save_image(Image(mask, load_image(MR_SMALL).affine), workdir / "m.nii.gz")
    assert_clean_error(run_meddiff("inpaint", "-i", MR_SMALL, "--mask", workdir / "m.nii.gz", "-o",
                                   workdir / "o3.nii.gz", "--modality", "CT"), "MR by its own header")
    assert_clean_error(run_meddiff("convert", ct_nifti, workdir / "o4.nii.gz", "--modality", "XX"), "'XX'")
    before.assert_unchanged(allowed=("m.nii.gz",))


# 5. No silent value loss


def test_values_beyond_the_templates_16_bits_get_a_wider_rescale_not_clipping(workdir):
    source = series(workdir / "ct", "CT")
    values = load_image(source).array.copy()
    values[3, 3, 1] = 1.17e6
    nifti = same_scan_nifti(source, workdir / "wide.nii.gz", values)
    out = workdir / "out"
    result = run_meddiff("convert", nifti, out, "--format", "dcm", "--template", source)
    assert result.code == 0, result.err
    back = load_image(out).array
    slope = max(float(pydicom.dcmread(p).RescaleSlope) for p in out.glob("*.dcm"))
    assert slope > 1 and np.abs(back - values).max() <= slope / 2 + 1e-3


def test_a_probability_map_keeps_its_fractions_and_a_fractional_seg_needs_a_threshold(workdir):
    mr = series(workdir / "mr", "MR")
    probability = np.linspace(0, 1, 16 * 16 * 3, dtype=np.float32).reshape(16, 16, 3)
    nifti = same_scan_nifti(mr, workdir / "p.nii.gz", probability)
    assert run_meddiff("convert", nifti, workdir / "out", "--format", "dcm", "--template", mr).code == 0
    assert np.abs(load_image(workdir / "out").array - probability).max() < 1e-4
    assert_clean_error(run_meddiff("convert", nifti, workdir / "seg.dcm", "--format", "seg", "--template", mr),
                       "--threshold")
    assert run_meddiff("convert", nifti, workdir / "seg.dcm", "--format", "seg", "--template", mr,
                       "--threshold", "0.5").code == 0
    assert np.array_equal(load_image(workdir / "seg.dcm").array > 0, probability > 0.5)


def test_storage_without_rescale_refuses_rather_than_flattening():
    from meddiff.errors import MeddiffError
    from meddiff.io.dicom_write import storage_scale

    assert storage_scale(np.array([0.0, 1000.0]), 1.0, -1024.0, False, "x") == (1.0, -1024.0)
    with pytest.raises(MeddiffError, match="do not fit"):
        storage_scale(np.array([0.0, 2e6]), 1.0, 0.0, False, "the source")
    with pytest.raises(MeddiffError, match="between"):
        storage_scale(np.array([0.0, 0.3, 1.0]), 1.0, 0.0, False, "the source")


# 6. Bounds, before any work


def test_unbounded_options_are_refused_before_work(workdir):
    ct = series(workdir / "ct", "CT")
    mr_nifti = workdir / "mr.nii.gz"
    mr = load_image(MR_SMALL)
    save_image(mr, mr_nifti)
    empty, grey = workdir / "empty.nii.gz", workdir / "grey.nii.gz"
    save_image(Image(np.zeros(mr.array.shape), mr.affine), empty)
    save_image(Image(np.linspace(0, 1, mr.array.size).reshape(mr.array.shape), mr.affine), grey)
    before = Snapshot(workdir)
    cases = [
        (("denoise", "-i", mr_nifti, "-o", "o.nii.gz", "--strength", "5"), "(0, 2]"),
        (("denoise", "-i", mr_nifti, "-o", "o.nii.gz", "--mask", empty), "the mask is empty"),
        (("denoise", "-i", mr_nifti, "-o", "o.nii.gz", "--mask", grey), "not binary"),
        (("inpaint", "-i", mr_nifti, "--mask", grey, "-o", "o.nii.gz", "--samples", "100000"), "1 to 100"),
        (("convert", ct, "x.dcm", "--format", "dcm"), "series of 3"),
    ]
    for argv, fragment in cases:
        assert_clean_error(run_meddiff(*argv), fragment)
    before.assert_unchanged()


def test_a_modality_outside_dicoms_terms_never_reaches_a_manifest(workdir):
    save_image(Image(np.zeros((8, 8), np.float32), np.eye(4)), workdir / "scans" / "a.nii.gz")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("manifest", "build", workdir / "scans", "-o", workdir / "m.jsonl",
                                   "--modality", "XX"), "'XX'", "MR")
    before.assert_unchanged()
    assert run_meddiff("manifest", "build", workdir / "scans", "-o", workdir / "m.jsonl", "--modality", "mr").code == 0
    assert '"modality":"MR"' in (workdir / "m.jsonl").read_text().replace(" ", "")


def test_export_stores_a_model_folder_in_float16_and_never_over_its_input(tiny_model, workdir):
    import torch
    from safetensors.torch import load_file

    from meddiff.pipelines import load_pipeline

    half = workdir / "half"
    assert run_meddiff("export", tiny_model, half, "--dtype", "float16").code == 0
    weights = load_file(str(half / "unet.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float16}
    assert (half / "unet.safetensors").stat().st_size < 0.6 * (tiny_model / "unet.safetensors").stat().st_size
    a = load_pipeline(tiny_model).generate(1, steps=2, progress=False)[0].array
    b = load_pipeline(half).generate(1, steps=2, progress=False)[0].array
    assert np.abs(a - b).max() < 1e-2 * (np.abs(a).max() + 1)  # float16 weights, float32 compute
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("export", half, half, "--dtype", "float16", "--overwrite"), "is the input")
    before.assert_unchanged()


def test_a_dcm_output_counts_the_objects_of_the_chosen_series(workdir):
    folder = workdir / "study"
    series(folder / "three", "MR")  # a 3-slice series, and a one-slice one beside it
    write_synthetic_dicom(Image(np.ones((16, 16), np.float32) * 7, np.eye(4), "MR"), folder / "one.dcm", "one")
    one = str(pydicom.dcmread(folder / "one.dcm").SeriesInstanceUID)
    assert run_meddiff("convert", folder, workdir / "one_out.dcm", "--series", one, "--format", "dcm").code == 0
    three = str(pydicom.dcmread(next((folder / "three").glob("*.dcm"))).SeriesInstanceUID)
    assert_clean_error(run_meddiff("convert", folder, workdir / "three_out.dcm", "--series", three,
                                   "--format", "dcm"), "series of 3")
