"""Manifest schema, validation messages, building with patient-level splits, the sample set."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DICOMDIR_TESTS

from meddiff import MeddiffError
from meddiff.data.build import build_records
from meddiff.data.manifest import Manifest, Record, write_manifest


def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def test_validation_names_line_and_field(tmp_path):
    good = {"image": "a.nii.gz", "modality": "MR", "split": "train"}
    cases = [
        ([good, "{not json"], "line 2: not valid JSON"),
        ([good, good, {**good, "split": "training"}], "line 3: field 'split'"),
        ([{"modality": "MR"}], "line 1: field 'image'"),
        ([{**good, "spacing": [1, -2, 1]}], "line 1: field 'spacing': .*positive"),
        ([{**good, "imgae": "typo.nii.gz"}], "line 1: field 'imgae'"),
        ([{**good, "labels": [1, 2]}], "line 1: field 'labels'"),
    ]
    for lines, message in cases:
        with pytest.raises(MeddiffError, match=message):
            Manifest.read(write_lines(tmp_path / "m.jsonl", lines))


def test_missing_files_are_named(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    lines = [{"image": "a.nii.gz", "modality": "MR"}, {"image": "a.nii.gz", "mask": "gone.nii.gz", "modality": "MR"}]
    manifest = Manifest.read(write_lines(tmp_path / "m.jsonl", lines))
    with pytest.raises(MeddiffError, match="line 2: field .mask.: file not found"):
        manifest.check_files()


def test_paths_resolve_against_manifest_or_data_root(tmp_path, monkeypatch):
    manifest = Manifest([Record(image="x", modality="MR")], tmp_path)
    assert manifest.resolve("sub/a.nii.gz") == tmp_path / "sub" / "a.nii.gz"
    assert manifest.resolve("/abs/a.nii.gz").as_posix() == "/abs/a.nii.gz"
    monkeypatch.delenv("MEDDIFF_DATA", raising=False)
    with pytest.raises(MeddiffError, match="MEDDIFF_DATA"):
        manifest.resolve("$MEDDIFF_DATA/ixi/a.nii.gz")
    monkeypatch.setenv("MEDDIFF_DATA", "/data")
    assert manifest.resolve("$MEDDIFF_DATA/ixi/a.nii.gz").as_posix() == "/data/ixi/a.nii.gz"


def test_deep_validation_catches_mask_shape_mismatch(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((8, 8, 4), np.float32), np.eye(4)), tmp_path / "img.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 5), np.float32), np.eye(4)), tmp_path / "mask.nii.gz")
    write_lines(tmp_path / "m.jsonl", [{"image": "img.nii.gz", "mask": "mask.nii.gz", "modality": "MR"}])
    manifest = Manifest.read(tmp_path / "m.jsonl")
    manifest.check_files()
    with pytest.raises(MeddiffError, match=r"line 1 .*mask shape \(8, 8, 5\) differs"):
        manifest.check_images()


def make_subjects(folder, subjects=12, scans=3):
    for s in range(subjects):
        for k in range(scans):
            path = folder / f"sub{s:02d}" / f"scan{k}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.full((4, 4, 4), s, np.float32), np.diag([1.5, 1.5, 3, 1])), path)


def test_patient_split_keeps_each_patient_in_one_split(tmp_path):
    make_subjects(tmp_path / "data")
    records = build_records(tmp_path / "data", tmp_path, modality="mr", val_fraction=0.3, test_fraction=0.3, salt="s")
    assert len(records) == 36 and {r.modality for r in records} == {"MR"}
    splits_of: dict[str, set] = {}
    for r in records:
        splits_of.setdefault(r.subject, set()).add(r.split)
    assert len(splits_of) == 12 and all(len(s) == 1 for s in splits_of.values())
    assert {r.split for r in records} == {"train", "val", "test"}
    assert records[0].spacing == [1.5, 1.5, 3.0]
    assert all("sub" not in r.subject for r in records)  # only the hash is kept
    again = build_records(tmp_path / "data", tmp_path, modality="MR", val_fraction=0.3, test_fraction=0.3, salt="s")
    assert [r.split for r in again] == [r.split for r in records]
    other_salt = build_records(tmp_path / "data", tmp_path, modality="MR", val_fraction=0.3, test_fraction=0.3,
                               salt="t")
    assert {r.subject for r in other_salt}.isdisjoint({r.subject for r in records})


def test_random_split_may_separate_scans_of_one_patient(tmp_path):
    make_subjects(tmp_path / "data")
    records = build_records(tmp_path / "data", tmp_path, modality="MR", split_by="random", val_fraction=0.3,
                            test_fraction=0.3)
    per_subject = {}
    for r in records:
        per_subject.setdefault(r.subject, set()).add(r.split)
    assert any(len(s) > 1 for s in per_subject.values())


def test_build_from_dicom_hashes_patient_ids_and_attaches_reports(tmp_path):
    data = tmp_path / "dicom"
    shutil.copytree(DICOMDIR_TESTS / "98892001", data / "98892001")
    shutil.copytree(DICOMDIR_TESTS / "98892003" / "MR700", data / "98892003" / "MR700")
    with open(tmp_path / "reports.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "report"])
        writer.writerow(["98892001/CT5N", "No acute intracranial abnormality."])
    records = build_records(data, tmp_path, reports_csv=tmp_path / "reports.csv", salt="x")
    by_image = {r.image: r for r in records}
    ct = by_image["dicom/98892001/CT5N"]
    assert ct.series is not None and ct.modality == "CT" and ct.spacing == pytest.approx([0.488281, 0.488281, 2.5])
    assert ct.report == "No acute intracranial abnormality."
    path = write_manifest(records, tmp_path / "m.jsonl")
    text = path.read_text()
    for f in data.rglob("*"):
        if f.is_file():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            assert str(ds.PatientID) not in text and str(ds.PatientName) not in text
    manifest = Manifest.read(path)
    manifest.check_files()


def test_build_needs_modality_for_non_dicom(tmp_path):
    make_subjects(tmp_path / "data", subjects=1, scans=1)
    with pytest.raises(MeddiffError, match="--modality"):
        build_records(tmp_path / "data", tmp_path)


def test_sample_set_is_a_valid_manifest(samples_dir):
    manifest = Manifest.read(samples_dir / "manifest.jsonl")
    manifest.check_files()
    manifest.check_images()
    splits = {r.image: r.split for r in manifest.records}
    assert splits["dipy_t1_coronal_slice.nii.gz"] == "val"
    assert splits["head_ct.nii.gz"] == "test"
    assert {splits["dipy_small_64d_b0.nii.gz"], splits["dipy_aniso_vox.nii.gz"]} == {"train"}


def test_build_refuses_patient_ids_in_folder_names(tmp_path):
    shutil.copytree(DICOMDIR_TESTS / "77654033" / "CR1", tmp_path / "77654033" / "CR1")  # folder named by PatientID
    with pytest.raises(MeddiffError, match="patient's ID"):
        build_records(tmp_path, tmp_path, salt="s")
    records = build_records(tmp_path, tmp_path, salt="s", allow_ids_in_paths=True)
    assert records[0].modality == "CR"


def test_subject_of_files_without_suffix_is_their_name(tmp_path):
    from pathlib import Path

    from meddiff.data.build import _subject_from_path

    assert _subject_from_path(Path("IM0001"), None) == "IM0001"
    assert _subject_from_path(Path("scan.nii.gz"), None) == "scan"


def test_include_glob_keeps_matching_files(tmp_path):
    make_subjects(tmp_path / "data", subjects=2, scans=3)
    records = build_records(tmp_path / "data", tmp_path, modality="MR", include="*/scan1.nii.gz", salt="s")
    assert sorted(r.image for r in records) == ["data/sub00/scan1.nii.gz", "data/sub01/scan1.nii.gz"]


def test_multiframe_dicom_is_recorded_as_3d(tmp_path, clinical_dicom):
    shutil.copy(clinical_dicom / "eCT_Supplemental.dcm", tmp_path / "ect.dcm")
    shutil.copy(clinical_dicom / "693_UNCR.dcm", tmp_path / "head.dcm")
    spacing = {r.image: r.spacing for r in build_records(tmp_path, tmp_path, salt="s", source="test")}
    assert spacing["ect.dcm"] == pytest.approx([0.388672, 0.388672, 10.0])
    assert spacing["head.dcm"] == pytest.approx([0.478516, 0.478516])
