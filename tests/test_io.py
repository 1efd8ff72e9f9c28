"""Readers and writers on real files, geometry checked against SimpleITK and the DICOM headers."""

from __future__ import annotations

import json
import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import DICOMDIR_TESTS, PYDICOM_TEST_FILES

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.io.itk import sitk_to_array_affine

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "ReferringPhysicianName")


def sitk_geometry(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK's own geometry, converted LPS -> RAS as MONAI's ITKReader does, and (i,j,k) voxels."""
    array = sitk.GetArrayFromImage(img).T
    dim = img.GetDimension()
    direction = np.array(img.GetDirection()).reshape(dim, dim)
    affine = np.eye(4)
    affine[:dim, :dim] = direction @ np.diag(img.GetSpacing())
    affine[:dim, 3] = img.GetOrigin()
    return array, np.diag([-1, -1, 1, 1]) @ affine


def test_nifti_geometry_agrees_with_simpleitk(mni_t1, dipy_oblique):
    for path in (mni_t1, dipy_oblique):
        image = load_image(path)
        array, affine = sitk_geometry(sitk.ReadImage(str(path)))
        np.testing.assert_allclose(image.affine, affine, atol=1e-4)
        np.testing.assert_allclose(image.array, array, rtol=1e-6)


def test_nifti_round_trip_is_exact(dipy_oblique, tmp_path):
    image = load_image(dipy_oblique, modality="MR")
    out = save_image(image, tmp_path / "copy.nii.gz")
    again = load_image(out)
    assert np.array_equal(again.array, image.array)
    np.testing.assert_allclose(again.affine, image.affine, atol=1e-5)
    assert again.modality == "MR"
    assert again.orientation == image.orientation


def test_dicom_series_geometry_matches_simpleitk_and_headers(ct_series_dir):
    image = load_image(ct_series_dir)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(ct_series_dir)))
    array, affine = sitk_geometry(reader.Execute())
    assert image.array.shape == (16, 16, 5)
    np.testing.assert_allclose(image.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(image.array, array)
    # independently from the headers: origin = first slice position, slices 2.5 mm apart, CT in HU
    headers = sorted((pydicom.dcmread(p) for p in ct_series_dir.iterdir()),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    first = headers[0]
    np.testing.assert_allclose(image.affine[:3, 3], np.array(first.ImagePositionPatient, float) * [-1, -1, 1],
                               atol=1e-4)
    assert image.spacing == pytest.approx((float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), 2.5), abs=1e-4)
    hu = first.pixel_array.astype(np.float32) * float(first.RescaleSlope) + float(first.RescaleIntercept)
    np.testing.assert_array_equal(image.array[:, :, 0], hu.T)
    assert image.modality == "CT"


def test_dicom_series_order_does_not_depend_on_file_names(ct_series_dir, tmp_path):
    files = sorted(ct_series_dir.iterdir())
    random.Random(3).shuffle(files)
    for n, f in enumerate(files):
        shutil.copy(f, tmp_path / f"img{n}")
    shuffled = load_image(tmp_path)
    reference = load_image(ct_series_dir)
    np.testing.assert_array_equal(shuffled.array, reference.array)
    np.testing.assert_allclose(shuffled.affine, reference.affine, atol=1e-6)


def test_folder_with_several_series_needs_a_choice(multi_series_dir):
    with pytest.raises(MeddiffError, match="holds 4 series") as err:
        load_image(multi_series_dir)
    assert "Cervical LAT" in str(err.value) and "Routine Brain" in str(err.value)
    cr = load_image(multi_series_dir, series=1)
    assert cr.modality == "CR" and cr.array.shape == (16, 16)
    with pytest.raises(MeddiffError, match="several series"):
        load_image(multi_series_dir, series=2)
    with pytest.raises(MeddiffError, match="uneven or repeated slice positions"):
        load_image(multi_series_dir, series="1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.2")


def test_single_ct_file_is_in_hounsfield_units(clinical_dicom):
    for path in (clinical_dicom / "693_UNCR.dcm", PYDICOM_TEST_FILES / "CT_small.dcm"):
        ds = pydicom.dcmread(path)
        image = load_image(path)
        expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(image.array, expected.T)
        assert image.array.min() < -800  # air and fat are negative in HU; raw stored values are not
        spacing = (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))
        assert image.spacing == pytest.approx(spacing, abs=1e-5)


def test_enhanced_multiframe_ct(clinical_dicom):
    path = clinical_dicom / "eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    image = load_image(path)
    assert image.array.shape == (512, 512, 2)
    rescale = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array.astype(np.float32) * float(rescale.RescaleSlope) + float(rescale.RescaleIntercept)
    np.testing.assert_array_equal(image.array, hu.transpose(2, 1, 0))
    positions = [f.PlanePositionSequence[0].ImagePositionPatient for f in ds.PerFrameFunctionalGroupsSequence]
    np.testing.assert_allclose(image.affine[:3, 3], np.array(positions[0], float) * [-1, -1, 1], atol=1e-4)
    assert image.spacing[2] == pytest.approx(10.0)


def test_monochrome1_radiograph_displays_bright_bones(clinical_dicom):
    path = clinical_dicom / "RG1_UNCR.dcm"
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    image = load_image(path)
    expected = (2 ** int(ds.BitsStored) - 1) - ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(image.array, expected.T)
    assert image.meta["PhotometricInterpretation"] == "MONOCHROME2"
    assert image.modality == "CR"


def test_no_patient_identifiers_in_meta(clinical_dicom, ct_series_dir):
    for path in [*sorted(clinical_dicom.glob("*_UNCR.dcm")), ct_series_dir, PYDICOM_TEST_FILES / "MR_small.dcm"]:
        first = path if path.is_file() else next(path.iterdir())
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        dumped = json.dumps(load_image(path).meta)
        for key in IDENTIFYING:
            assert key not in dumped
            value = str(ds.get(key, "") or "")
            if len(value) > 3:
                assert value not in dumped


def test_dicom_to_nifti_keeps_geometry(ct_series_dir, tmp_path):
    image = load_image(ct_series_dir)
    again = load_image(save_image(image, tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(again.affine, image.affine, atol=1e-5)
    assert np.array_equal(again.array, image.array)
    assert again.modality == "CT"


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_mha_nrrd_round_trip_and_simpleitk_view(dipy_oblique, tmp_path, suffix):
    image = load_image(dipy_oblique)
    path = save_image(image, tmp_path / f"vol{suffix}")
    again = load_image(path)
    np.testing.assert_array_equal(again.array, image.array)
    np.testing.assert_allclose(again.affine, image.affine, atol=1e-4)
    array, affine = sitk_to_array_affine(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(affine, image.affine, atol=1e-4)


def test_png_keeps_integer_radiographs_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for top in (255, 4095):
        array = rng.integers(0, top + 1, size=(40, 30)).astype(np.float32)
        again = load_image(save_image(Image(array), tmp_path / f"x{top}.png"))
        np.testing.assert_array_equal(again.array, array)


def test_rgb_picture_becomes_grey(tmp_path):
    from PIL import Image as PILImage

    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 150, 200
    PILImage.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    image = load_image(tmp_path / "c.jpg")
    assert image.array.shape == (30, 20)
    assert image.array.mean() == pytest.approx(0.299 * 100 + 0.587 * 150 + 0.114 * 200, abs=2)


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.dcm").write_text("not an image")
    nifti = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    nib.save(nifti, tmp_path / "ok.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:-40])
    (tmp_path / "scan.xyz").write_text("?")
    for name, message in [
        ("cut.dcm", "cannot"),
        ("text.dcm", "not a DICOM"),
        ("cut.nii.gz", "cannot read NIfTI"),
        ("scan.xyz", "unsupported format"),
        ("missing.nii", "does not exist"),
    ]:
        with pytest.raises(MeddiffError, match=message):
            load_image(tmp_path / name)


def test_nan_and_empty_images_are_refused(tmp_path):
    bad = np.ones((4, 4, 4), np.float32)
    bad[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(MeddiffError, match="NaN"):
        load_image(tmp_path / "nan.nii.gz")
    with pytest.raises(MeddiffError, match="NaN"):
        save_image(Image(bad), tmp_path / "out.nii.gz")
    with pytest.raises(MeddiffError, match="empty"):
        save_image(Image(np.zeros((0, 4), np.float32)), tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_save_never_overwrites_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    image = Image(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    path = save_image(image, tmp_path / "a.nii.gz")
    before = path.read_bytes()
    with pytest.raises(MeddiffError, match="already exists"):
        save_image(Image(np.zeros((2, 3, 4))), path)
    assert path.read_bytes() == before

    import meddiff.io as io

    def half_write(image, tmp):
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "write_nifti", half_write)
    with pytest.raises(OSError):
        save_image(image, tmp_path / "b.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz"]


def test_meta_refuses_keys_off_the_allow_list():
    with pytest.raises(MeddiffError, match="allow-list"):
        Image(np.zeros((2, 2)), meta={"PatientName": "X"})


def test_dicomdir_index_files_are_skipped(tmp_path, ct_series_dir):
    shutil.copytree(ct_series_dir, tmp_path / "series")
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", tmp_path / "DICOMDIR")
    (tmp_path / "README.txt").write_text("a note")
    assert load_image(tmp_path).array.shape == (16, 16, 5)
