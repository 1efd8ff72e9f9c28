"""DICOM out as a PACS expects: the standard's validator (dciodvfy) on every object type meddiff writes, derived
series in the source's study, and a real PACS (Orthanc) round trip over DICOM networking."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from meddiff import Image
from meddiff.cli.main import main
from meddiff.io import load_image, save_image
from meddiff.io.dicom_write import write_synthetic_dicom

DCIODVFY = shutil.which("dciodvfy")
ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed (Debian package dicom3tools; "
                                                                ".ci/run installs it)")


def validator_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file (warnings are advice, errors break the IOD)."""
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def ct_series(tmp_path: Path) -> Path:
    """A classic CT series (20 slices of the chest CT's held-out slab, in HU), as meddiff writes it."""
    from meddiff.data.samples import write_samples

    write_samples(tmp_path / "samples", names=["chest_ct_test"])
    image = load_image(tmp_path / "samples" / "chest_ct_test.nii.gz", modality="CT")
    image = Image(image.array[::4, ::4], image.affine @ np.diag([4.0, 4.0, 1.0, 1.0]), "CT")
    return write_synthetic_dicom(image, tmp_path / "ct_series", "test series")


def multiframe_ct(tmp_path: Path) -> Path:
    """The classic CT series as one Legacy Converted Enhanced CT object (highdicom), the multi-frame kind."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    series = ct_series(tmp_path)
    legacy = [pydicom.dcmread(p) for p in sorted(series.glob("*.dcm"))]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy, series_instance_uid=generate_uid(), series_number=5, sop_instance_uid=generate_uid(),
        instance_number=1)
    enhanced.Laterality = ""  # two gaps of the converter's output, which the validator reports for the source itself
    del enhanced.ReferencedSeriesSequence
    enhanced.save_as(tmp_path / "enhanced_ct.dcm")
    return tmp_path / "enhanced_ct.dcm"


@needs_dciodvfy
def test_every_object_meddiff_writes_passes_the_standards_validator(tmp_path, ct_series_dir):
    """Synthetic CT, MR and Secondary Capture; derived MR (denoise of a real scan) and CT (convert on a template, and
    upsample of a real series: new slices between the source's)."""
    mr = load_image(get_testdata_file("MR_small.dcm"))
    write_synthetic_dicom(Image(mr.array[:, :, None].repeat(3, 2), np.diag([1, 1, 2, 1.0]), "MR"),
                          tmp_path / "synthetic_mr", "test")
    write_synthetic_dicom(Image(mr.array / 1000, mr.affine, "MR"), tmp_path / "narrow_mr.dcm", "test")
    write_synthetic_dicom(Image(mr.array, mr.affine, "CR"), tmp_path / "synthetic_cr.dcm", "test")
    series = ct_series(tmp_path)
    assert main(["denoise", "-i", get_testdata_file("MR_small.dcm"), "-o", str(tmp_path / "denoised"),
                 "--format", "dcm"]) == 0
    assert main(["convert", str(series), str(tmp_path / "ct.nii.gz")]) == 0
    assert main(["convert", str(tmp_path / "ct.nii.gz"), str(tmp_path / "derived_ct"), "--format", "dcm",
                 "--template", str(series)]) == 0
    assert main(["upsample", "-i", str(ct_series_dir), "-o", str(tmp_path / "upsampled"), "--format", "dcm",
                 "--factor", "2", "--method", "cubic"]) == 0
    ct = load_image(tmp_path / "ct.nii.gz")
    save_image(Image((ct.array > 200).astype(np.uint8), ct.affine), tmp_path / "bone.nii.gz")
    assert main(["convert", str(tmp_path / "bone.nii.gz"), str(tmp_path / "bone_seg.dcm"), "--format", "seg",
                 "--template", str(series)]) == 0
    objects = [tmp_path / "bone_seg.dcm", tmp_path / "synthetic_mr" / "slice_0001.dcm", tmp_path / "narrow_mr.dcm",
               tmp_path / "synthetic_cr.dcm",
               series / "slice_0000.dcm", tmp_path / "denoised" / "slice_0000.dcm",
               tmp_path / "derived_ct" / "slice_0007.dcm"]
    assert {pydicom.dcmread(p).SOPClassUID.name for p in objects} == {
        "MR Image Storage", "CT Image Storage", "Secondary Capture Image Storage", "Segmentation Storage"}
    for path in objects:
        assert validator_errors(path) == [], path
    source = sorted(ct_series_dir.iterdir())[0]  # a real series: its derived slices add no error of their own
    assert set(validator_errors(tmp_path / "upsampled" / "slice_0003.dcm")) <= set(validator_errors(source))


def test_a_derived_series_is_a_new_series_of_the_source_study_on_its_slices(tmp_path):
    series = ct_series(tmp_path)
    assert main(["convert", str(series), str(tmp_path / "ct.nii.gz")]) == 0
    edited = load_image(tmp_path / "ct.nii.gz")
    edited.array = edited.array + 0.4  # rounds back to the source's whole HU
    save_image(edited, tmp_path / "edited.nii.gz")
    out = tmp_path / "derived"
    assert main(["convert", str(tmp_path / "edited.nii.gz"), str(out), "--format", "dcm", "--template",
                 str(series)]) == 0
    sources = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, series.glob("*.dcm"))}
    derived = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    assert len(derived) == len(sources) == 20
    assert len({ds.SeriesInstanceUID for ds in derived}) == 1
    for ds in derived:
        source = sources[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SOPInstanceUID != source.SOPInstanceUID
        assert ds.ImageType[:2] == ["DERIVED", "SECONDARY"] and ds.DerivationCodeSequence[0].CodeValue
        assert ds.ImagePositionPatient == source.ImagePositionPatient
        assert ds.ImageOrientationPatient == source.ImageOrientationPatient and ds.PixelSpacing == source.PixelSpacing
        hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
        assert np.array_equal(hu, pydicom.pixels.apply_rescale(source.pixel_array, source))
    # not on the template's grid: refused before anything is written
    edited.array = edited.array[:, :, 2:]
    edited.affine = edited.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2], [0, 0, 0, 1.0]])
    save_image(edited, tmp_path / "cropped.nii.gz")
    assert main(["convert", str(tmp_path / "cropped.nii.gz"), str(tmp_path / "bad"), "--format", "dcm", "--template",
                 str(series)]) == 2
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_a_multiframe_source_gives_a_multiframe_derived_object(tmp_path):
    """One enhanced CT object in, one out: frames in the source's order, each frame's derivation recorded in its
    functional group, HU exact; no validator errors."""
    source = multiframe_ct(tmp_path)
    assert main(["convert", str(source), str(tmp_path / "ct.nii.gz")]) == 0
    out = tmp_path / "derived"
    assert main(["convert", str(tmp_path / "ct.nii.gz"), str(out), "--format", "dcm", "--template", str(source)]) == 0
    (path,) = out.glob("*.dcm")
    ds, original = pydicom.dcmread(path), pydicom.dcmread(source)
    assert ds.NumberOfFrames == original.NumberOfFrames == 20 and ds.StudyInstanceUID == original.StudyInstanceUID
    assert ds.SOPInstanceUID != original.SOPInstanceUID and ds.ImageType[0] == "DERIVED"
    for frame, group in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
        reference = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert (reference.ReferencedSOPInstanceUID, reference.ReferencedFrameNumber) == (original.SOPInstanceUID, frame)
        assert (group.PlanePositionSequence[0].ImagePositionPatient
                == original.PerFrameFunctionalGroupsSequence[frame - 1].PlanePositionSequence[0].ImagePositionPatient)
    assert np.array_equal(load_image(out).array, load_image(source).array)
    if DCIODVFY:
        assert validator_errors(source) == [] and validator_errors(path) == []


def test_an_inpainting_mask_given_as_dicom_seg_selects_the_same_voxels(tmp_path):
    from meddiff.pipelines.inpaint import mask_on_grid

    series = ct_series(tmp_path)
    image = load_image(series)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[40:70, 50:90, 5:9] = 1
    save_image(Image(mask, image.affine), tmp_path / "mask.nii.gz")
    assert main(["convert", str(tmp_path / "mask.nii.gz"), str(tmp_path / "mask_seg.dcm"), "--format", "seg",
                 "--template", str(series)]) == 0
    seg = load_image(tmp_path / "mask_seg.dcm")
    assert seg.modality == "SEG" and np.array_equal(mask_on_grid(image, seg), mask.astype(bool))
    assert main(["convert", str(tmp_path / "mask.nii.gz"), str(tmp_path / "no_template.dcm"), "--format", "seg"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--format", "dcm", "--send", "ORTHANC@localhost"], "AET@HOST:PORT"),
    (["--send", "ORTHANC@localhost:4242"], "add --format dcm"),
    (["--format", "dcm", "--send", "NOBODY@127.0.0.1:1"], "cannot send"),
])
def test_send_is_checked_and_a_missing_pacs_is_one_line(argv, message, tmp_path, capsys):
    out = tmp_path / ("out" if "--format" in argv else "out.nii.gz")
    assert main(["denoise", "-i", get_testdata_file("MR_small.dcm"), "-o", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    # bad options are refused before any work; a PACS that does not answer leaves the written series in place
    assert out.exists() == ("NOBODY" in argv[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_and_get(orthanc, study_uid: str) -> tuple[list[Dataset], list[Dataset]]:
    """C-FIND the series of a study, then C-GET every image of it: (series found, images retrieved)."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import (
        MRImageStorage,
        StudyRootQueryRetrieveInformationModelFind,
        StudyRootQueryRetrieveInformationModelGet,
    )

    aet, host, port = orthanc
    retrieved = []

    def on_store(event):
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        retrieved.append(dataset)
        return 0x0000

    ae = AE("MEDDIFF")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage)
    association = ae.associate(host, port, ae_title=aet, ext_neg=[build_role(MRImageStorage, scp_role=True)],
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert association.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "SERIES", study_uid
    query.SeriesInstanceUID = query.SeriesDescription = query.SeriesNumber = query.Modality = ""
    found = [identifier for status, identifier in
             association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
             if status and status.Status in (0xFF00, 0xFF01)]
    get = Dataset()
    get.QueryRetrieveLevel, get.StudyInstanceUID = "STUDY", study_uid
    statuses = [status.Status for status, _ in association.send_c_get(get, StudyRootQueryRetrieveInformationModelGet)
                if status]
    association.release()
    assert statuses and statuses[-1] == 0x0000, statuses
    return found, retrieved


def test_a_denoised_series_goes_back_to_the_pacs_in_the_source_study(orthanc, tmp_path, capsys):
    """Real MR in the PACS; `meddiff denoise --format dcm --send` stores the derived series; C-FIND finds it in the
    same study, C-GET brings it back, and its pixels are meddiff's output in the image's units."""
    from meddiff.io.dicom_net import send

    source = Path(get_testdata_file("MR_small.dcm"))
    assert send([source], "{}@{}:{}".format(*orthanc)) == 1
    destination = "{}@{}:{}".format(*orthanc)
    out = tmp_path / "denoised"
    assert main(["denoise", "-i", str(source), "-o", str(out), "--format", "dcm", "--send", destination]) == 0
    assert "sent 1 DICOM files" in capsys.readouterr().out
    assert main(["denoise", "-i", str(source), "-o", str(tmp_path / "denoised.nii.gz")]) == 0

    study = pydicom.dcmread(source).StudyInstanceUID
    found, retrieved = find_and_get(orthanc, study)
    written = pydicom.dcmread(out / "slice_0000.dcm")
    assert {str(s.SeriesInstanceUID) for s in found} == {pydicom.dcmread(source).SeriesInstanceUID,
                                                         written.SeriesInstanceUID}
    (back,) = [ds for ds in retrieved if ds.SeriesInstanceUID == written.SeriesInstanceUID]
    assert back.SOPInstanceUID == written.SOPInstanceUID and back.StudyInstanceUID == study
    assert np.array_equal(back.pixel_array, written.pixel_array)
    expected = load_image(tmp_path / "denoised.nii.gz").array  # the same denoising, written as NIfTI
    assert np.abs(load_image(out).array - expected).max() <= 0.5  # stored to the source's whole units


def test_deidentify_exports_the_derived_series_under_the_basic_profile(tmp_path):
    """--deidentify: no source identifier or UID is left, the series stays one series, the validator is content."""
    source = tmp_path / "source"
    source.mkdir()
    original = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    original.PatientName, original.PatientID, original.PatientBirthDate = "Doe^Jane", "PID-7731", "19610203"
    original.InstitutionName, original.StudyDescription = "St Example Hospital", "brain Doe follow-up"
    original.save_as(source / "mr.dcm")
    out = tmp_path / "export.dcm"
    assert main(["denoise", "-i", str(source / "mr.dcm"), "-o", str(out), "--format", "dcm", "--deidentify"]) == 0
    ds = pydicom.dcmread(out)
    text = out.read_bytes()
    for value in ("Doe", "PID-7731", "19610203", "St Example", original.StudyInstanceUID,
                  original.SOPInstanceUID, original.FrameOfReferenceUID):
        assert value.encode() not in text, value
    assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID != original.SOPInstanceUID
    assert np.array_equal(load_image(out).array.shape, load_image(source / "mr.dcm").array.shape)
    if DCIODVFY:
        assert validator_errors(out) == []
    # a NIfTI carries no identity to remove: refused before work
    assert main(["denoise", "-i", str(source / "mr.dcm"), "-o", str(tmp_path / "x.nii.gz"), "--deidentify"]) == 2
