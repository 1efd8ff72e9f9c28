"""No patient identifier survives any verb: a real DICOM carrying a name, ID, birth date, institution and
referring physician goes through info, convert, denoise, inpaint, manifest build, generate and evaluate, and no
identifier value appears in any byte of anything they wrote (files, manifests, caches, logs, wandb/ or
lightning_logs/ folders, compressed members unpacked) or printed.
"""

from __future__ import annotations

import gzip
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from harness import run_meddiff

from meddiff import Image, load_image, save_image

IDENTIFIERS = {
    "PatientName": "ZZTESTPATIENT^ANNA",
    "PatientID": "ID-7734211",
    "PatientBirthDate": "19510307",
    "InstitutionName": "ST ELSEWHERE HOSPITAL",
    "ReferringPhysicianName": "QQREFERRER^BORIS",
    "OtherPatientIDs": "OTHER-5519023",
    "AccessionNumber": "ACC99831772",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.773421199",
}
# what to look for: every value, and the parts of person names (a writer may reorder or split them)
NEEDLES = sorted({v for v in IDENTIFIERS.values()} | {"ZZTESTPATIENT", "QQREFERRER", "7734211", "1951-03-07",
                                                      "07.03.1951"})


def identified_mr(folder: Path, copies: int = 6) -> list[Path]:
    """pydicom's real MR slice (64x64), as ``copies`` single-file series of one identified patient."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for n in range(copies):
        ds = pydicom.dcmread(pydicom.data.get_testdata_file("MR_small.dcm"))
        for key, value in IDENTIFIERS.items():
            setattr(ds, key, value)
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesNumber = n + 1
        ds.save_as(folder / f"slice{n}.dcm", enforce_file_format=True)
        files.append(folder / f"slice{n}.dcm")
    return files


def unpacked(path: Path) -> list[tuple[str, bytes]]:
    """A file's bytes, plus its decompressed content when it is gzip (.nii.gz) or zip (.npz, .ckpt)."""
    data = path.read_bytes()
    parts = [(str(path), data)]
    if data[:2] == b"\x1f\x8b":
        parts.append((f"{path} (gunzipped)", gzip.decompress(data)))
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            parts += [(f"{path}:{name}", zf.read(name)) for name in zf.namelist()]
    return parts


def leaks(work: Path, printed: str) -> list[str]:
    found = []
    for path in sorted(p for p in work.rglob("*") if p.is_file()):
        for where, data in unpacked(path):
            found += [f"{needle!r} in {where}" for needle in NEEDLES
                      if needle.encode() in data or needle.encode("utf-16-le") in data]
    found += [f"{needle!r} printed" for needle in NEEDLES if needle in printed]
    found += [f"{needle!r} in a file name" for needle in NEEDLES for p in work.rglob("*")
              if needle in str(p.relative_to(work))]
    return found


@pytest.fixture
def identified(tmp_path) -> list[Path]:
    return identified_mr(tmp_path / "incoming" / "study")


def test_fixture_carries_the_identifiers(identified):
    ds = pydicom.dcmread(identified[0])
    assert str(ds.PatientName) == IDENTIFIERS["PatientName"] and ds.InstitutionName == IDENTIFIERS["InstitutionName"]


def test_no_identifier_in_any_output_or_message(identified, tiny_model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(work))
    mr = identified[0]
    image = load_image(mr)
    fill = np.zeros(image.array.shape, np.uint8)
    fill[8:24, 8:24] = 1
    save_image(Image(fill, image.affine, "MR"), work / "mask.nii.gz")
    inpaint = ["inpaint", "-i", mr, "--mask", "mask.nii.gz", "--model", tiny_model, "--steps", "2", "--resample", "1"]
    steps = [
        ["info", "--json", mr],
        ["info", mr],
        ["convert", mr, "mr.nii.gz"],
        ["convert", mr, "mr.mha"],
        ["convert", mr, "mr.nrrd"],
        ["convert", mr, "mr.png"],
        ["denoise", "-i", mr, "-o", "denoised.nii.gz"],
        ["manifest", "build", mr.parent, "-o", "real/manifest.jsonl", "--modality", "MR"],
        [*inpaint, "-o", "filled.nii.gz"],
        [*inpaint, "-o", "filled.dcm"],
        ["denoise", "-i", mr, "-o", "denoised_dcm", "--format", "dcm"],
        ["generate", "--model", tiny_model, "-n", "6", "-o", "fake_nii", "--steps", "2", "--format", "nii.gz"],
        ["generate", "--model", tiny_model, "-n", "2", "-o", "fake_dcm", "--steps", "2", "--format", "dcm"],
        ["evaluate", "--real", "real/manifest.jsonl", "--fake", "fake_nii", "--features", "meddiff_mri",
         "--json", "eval.json", "--cache", "cache"],
    ]
    printed = []
    for argv in steps:
        result = run_meddiff(*argv, cwd=work)
        assert result.code == 0, f"{argv[:2]} failed: {result.err}"
        printed.append(result.out + result.err)
    for name in ("mr.nii.gz", "mr.mha", "mr.nrrd", "mr.png", "denoised.nii.gz", "filled.nii.gz", "filled.dcm",
                 "denoised_dcm", "real/manifest.jsonl", "fake_nii", "fake_dcm", "eval.json", "cache"):
        assert (work / name).exists(), f"{name} was not written"
    # DICOM derived from the patient's scan is a new series of that patient's study: its identifiers belong
    # there and nowhere else (not in the messages, manifests or other outputs)
    source = pydicom.dcmread(mr)
    for derived in (work / "filled.dcm", work / "denoised_dcm" / "slice_0000.dcm"):
        ds = pydicom.dcmread(derived)
        assert (ds.PatientID, ds.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and "DERIVED" in ds.ImageType
    shutil.move(work / "filled.dcm", tmp_path / "filled.dcm")
    shutil.move(work / "denoised_dcm", tmp_path / "denoised_dcm")
    assert not leaks(work, "\n".join(printed)), leaks(work, "\n".join(printed))


def test_the_leak_check_sees_an_identifier(identified, tmp_path):
    """The check itself: a copied DICOM, a gzipped one and a zip member all count as leaks."""
    work = tmp_path / "check"
    work.mkdir()
    data = identified[0].read_bytes()
    (work / "copy.dcm").write_bytes(data)
    (work / "copy.dcm.gz").write_bytes(gzip.compress(data))
    with zipfile.ZipFile(work / "cache.npz", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("header.txt", data)
    found = leaks(work, "")
    assert any("copy.dcm.gz (gunzipped)" in f for f in found) and any("cache.npz:header.txt" in f for f in found)
