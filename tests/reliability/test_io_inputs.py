"""Bad image files through ``info`` and ``convert``: exit 2, one line that names the file and says why,
nothing else on the terminal (not even a C++ reader's own lines on the process' stderr), nothing written.
And the shapes real images come in — (X, Y), (X, Y, 1), (1, X, Y), (X, 1, Y), 8x8, odd sizes — converted
between NIfTI, MHA, NRRD and PNG with voxels and geometry kept.
"""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from harness import Snapshot, assert_clean_error, run_meddiff

from meddiff.io import load_image


def _nifti(array: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, np.diag([0.9, 0.9, 2.5, 1.0]), dtype=array.dtype)
    return img.to_bytes()


def _with_dims(data: bytes, dims: list[int]) -> bytes:
    """A NIfTI-1 file whose header dim[0..7] (bytes 40..55) are ``dims``: what a corrupt writer leaves."""
    buf = bytearray(data)
    struct.pack_into("<8h", buf, 40, *dims)
    return bytes(buf)


def _nifti2_dims(dims: list[int]) -> bytes:
    buf = bytearray(nib.Nifti2Image(np.ones((8, 8, 3), np.float32), np.eye(4)).to_bytes())
    struct.pack_into("<8q", buf, 16, *dims)
    return bytes(buf)


def _dicom(name: str, **changes) -> bytes:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    for key, value in changes.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _real(name: str) -> bytes:
    return Path(pydicom.data.get_testdata_file(name)).read_bytes()


def _mha(header: str, data: bytes = b"x" * 100) -> bytes:
    return (f"ObjectType = Image\nNDims = 3\n{header}\n"
            "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n").encode() + data


def _sitk_bytes(tmp: Path, name: str, array: np.ndarray, compress: bool = False) -> bytes:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp / name), useCompression=compress)
    return (tmp / name).read_bytes()


def _nan_volume() -> np.ndarray:
    a = np.ones((8, 8, 3), np.float32)
    a[2, 2, 1] = np.nan
    return a


RGB = np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])

# file name -> (bytes of the bad file (given a scratch folder), fragment the error line must hold)
BAD_FILES = {
    "complex.nii.gz": (lambda t: gzip.compress(_nifti((np.ones((8, 8, 3)) * (1 + 2j)).astype(np.complex64))),
                       "complex values"),
    "complex128.nii": (lambda t: _nifti((np.ones((8, 8)) * 1j).astype(np.complex128)), "complex values"),
    "rgb.nii.gz": (lambda t: gzip.compress(_nifti(np.zeros((8, 8, 3), RGB))), "colour voxels"),
    "huge_dims.nii": (lambda t: _with_dims(_nifti(np.ones((8, 8, 3), np.float32)),
                                           [3, 30000, 30000, 30000, 1, 1, 1, 1]), "header promises"),
    "huge_dims.nii.gz": (lambda t: gzip.compress(_with_dims(_nifti(np.ones((8, 8, 3), np.float32)),
                                                            [3, 30000, 30000, 30000, 1, 1, 1, 1])), "header promises"),
    "nifti2_1e9.nii": (lambda t: _nifti2_dims([3, 10**9, 10**9, 3, 1, 1, 1, 1]), "header promises"),
    "negative_dim.nii": (lambda t: _with_dims(_nifti(np.ones((8, 8, 3), np.float32)), [3, -8, 8, 3, 1, 1, 1, 1]),
                         "at least 1 voxel"),
    "zero_dim.nii.gz": (lambda t: gzip.compress(_with_dims(_nifti(np.ones((8, 8, 3), np.float32)),
                                                           [3, 0, 8, 3, 1, 1, 1, 1])), "at least 1 voxel"),
    "no_axes.nii": (lambda t: _with_dims(_nifti(np.ones((8, 8, 3), np.float32)), [0, 8, 8, 3, 1, 1, 1, 1]), "axes"),
    "five_axes.nii.gz": (lambda t: gzip.compress(_nifti(np.ones((4, 4, 3, 2, 2), np.float32))), "5 axes"),
    "truncated.nii": (lambda t: _nifti(np.ones((8, 8, 3), np.float32))[:400], "header promises"),
    "truncated.nii.gz": (lambda t: gzip.compress(_nifti(np.ones((8, 8, 3), np.float32)))[:-40], "cannot read NIfTI"),
    "garbage.nii": (lambda t: b"not a NIfTI header " * 40, "cannot read NIfTI"),
    "nan.nii.gz": (lambda t: gzip.compress(_nifti(_nan_volume())), "NaN"),
    "empty.nii.gz": (lambda t: b"", "0 bytes"),
    "cut_ct.dcm": (lambda t: _real("CT_small.dcm")[: len(_real("CT_small.dcm")) // 2], "pixel data holds"),
    "cut_mr_no_suffix": (lambda t: _real("MR_small.dcm")[:-500], "pixel data holds"),
    "header_cut.dcm": (lambda t: _real("CT_small.dcm")[:300], "not a DICOM image"),
    "rows_zero.dcm": (lambda t: _dicom("MR_small.dcm", Rows=0), "at least 1 voxel"),
    "huge_frames.dcm": (lambda t: _dicom("MR_small.dcm", Rows=65535, Columns=65535, NumberOfFrames=10000),
                        "header promises"),
    "empty.dcm": (lambda t: b"", "0 bytes"),
    "truncated.mha": (lambda t: _sitk_bytes(t, "a.mha", np.ones((6, 7, 8), np.float32))[:-700],
                      "data not read completely"),
    "truncated.nrrd": (lambda t: _sitk_bytes(t, "a.nrrd", np.random.default_rng(0).random((6, 7, 8), np.float32),
                                             True)[:-300], "expected"),
    "huge.mha": (lambda t: _mha("DimSize = 1000000000 1000000000 1000"), "memory"),
    "zero.mha": (lambda t: _mha("DimSize = 0 8 8"), "at least 1 voxel"),
    "header_only.mha": (lambda t: _sitk_bytes(t, "b.mha", np.ones((6, 7, 8), np.float32))[:100], "cannot read"),
    "truncated.png": (lambda t: _sitk_bytes(t, "a.png",
                                            np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8))[:120],
                      "cannot read"),
    "text.png": (lambda t: b"this is a text file\n" * 10, "cannot read"),
    "empty.png": (lambda t: b"", "0 bytes"),
}


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad_inputs")
    scratch = tmp_path_factory.mktemp("scratch")
    for name, (build, _) in BAD_FILES.items():
        (folder / name).write_bytes(build(scratch))
    return folder


VERBS = {"info": lambda path: ["info", path], "info --json": lambda path: ["info", "--json", path],
         "convert": lambda path: ["convert", path, "out.nii.gz"]}


@pytest.mark.parametrize("verb", list(VERBS))
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_ends_in_one_line_naming_it(name, verb, bad_folder, workdir, capfd):
    path = bad_folder / name
    before, inputs = Snapshot(workdir), Snapshot(bad_folder)
    result = run_meddiff(*VERBS[verb](path))
    assert_clean_error(result, BAD_FILES[name][1], str(path))
    assert len(result.err.strip().splitlines()) == 1, result.err  # no warnings or reader chatter above it
    assert capfd.readouterr().err == ""  # nor on the process' stderr, where C++ readers print
    assert result.out == ""
    before.assert_unchanged()
    inputs.assert_unchanged()


@pytest.mark.parametrize("shape", [(9, 7, 5), (8, 8, 3, 2)])
def test_volume_to_png_is_refused_before_writing(shape, workdir):
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), workdir / "volume.nii.gz")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("convert", "volume.nii.gz", "slice.png"), "2D images", "slice.png")
    before.assert_unchanged()


# ---- the shapes real images come in (issue class 7a, for the I/O verbs) ----

SHAPES = [(8, 8), (8, 8, 1), (1, 8, 8), (8, 1, 8), (7, 9), (9, 7, 5), (8, 8, 3, 2)]
OUTPUTS = [".nii", ".mha", ".nrrd", ".png"]


def _flat_2d(shape) -> bool:
    return sum(n > 1 for n in shape) == 2


@pytest.mark.parametrize("suffix", OUTPUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_through_info_and_convert(shape, suffix, workdir):
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    voxels = np.random.default_rng(0).integers(0, 200, shape).astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, affine), workdir / "in.nii.gz")
    info = run_meddiff("info", "in.nii.gz")
    assert info.code == 0 and f"shape        {' x '.join(map(str, shape))}" in info.out, info.err
    if suffix == ".png" and not _flat_2d(shape):
        assert_clean_error(run_meddiff("convert", "in.nii.gz", f"out{suffix}"), "2D images")
        return
    result = run_meddiff("convert", "in.nii.gz", f"out{suffix}")
    assert result.code == 0, result.err
    back = load_image(workdir / f"out{suffix}")
    np.testing.assert_array_equal(back.array.squeeze(), voxels.squeeze())  # same voxels, in the same order
    if suffix != ".png":  # a picture holds no geometry (convert warns); the others keep it exactly
        np.testing.assert_allclose(back.affine, affine, atol=1e-4)
        again = run_meddiff("convert", f"out{suffix}", "again.nii.gz")
        assert again.code == 0, again.err
        np.testing.assert_allclose(load_image(workdir / "again.nii.gz").affine, affine, atol=1e-4)


@pytest.mark.parametrize("dtype", ["int64", "uint8", "int8", "uint16", "float64", "int32"])
def test_odd_real_voxel_types_read_exactly(dtype, workdir):
    voxels = (np.arange(8 * 8 * 3) % 100).reshape(8, 8, 3).astype(dtype)
    nib.save(nib.Nifti1Image(voxels, np.eye(4), dtype=voxels.dtype), workdir / "in.nii.gz")
    result = run_meddiff("convert", "in.nii.gz", "out.mha")
    assert result.code == 0, result.err
    np.testing.assert_array_equal(load_image(workdir / "out.mha").array, voxels.astype(np.float32))


def test_dicom_slice_to_png_and_mha(workdir):
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    for out in ("ct.png", "ct.mha"):
        result = run_meddiff("convert", ct, out)
        assert result.code == 0, result.err
    reference = load_image(ct)
    np.testing.assert_allclose(load_image(workdir / "ct.mha").affine, reference.affine, atol=1e-4)
    assert load_image(workdir / "ct.png").array.shape == reference.array.shape


def test_reading_in_threads_leaves_stderr_and_warning_filters_alone(tmp_path):
    """MONAI's CacheDataset reads images in threads: the readers' stderr capture and warning silencing
    (process-wide state) must not be left swapped by threads interleaving."""
    import os
    import threading
    import warnings

    mha = tmp_path / "a.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((4, 5, 6), np.float32)), str(mha))
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    fd_before, filters_before = os.fstat(2), list(warnings.filters)

    def read():
        for _ in range(10):
            load_image(mha)
            load_image(ct)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    read()
    for t in threads:
        t.join()
    fd_after = os.fstat(2)
    assert (fd_after.st_dev, fd_after.st_ino) == (fd_before.st_dev, fd_before.st_ino)
    assert warnings.filters == filters_before


@pytest.mark.parametrize("verb", ["info", "convert"])
def test_series_with_a_cut_slice_names_that_slice(verb, ct_series_dir, tmp_path, workdir):
    series = tmp_path / "series"
    series.mkdir()
    files = sorted(ct_series_dir.iterdir())
    for f in files:
        (series / f.name).write_bytes(f.read_bytes())
    cut = series / files[2].name
    cut.write_bytes(cut.read_bytes()[:-200])
    before = Snapshot(workdir)
    argv = ["info", series] if verb == "info" else ["convert", series, "ct.nii.gz"]
    assert_clean_error(run_meddiff(*argv), str(cut), "pixel data holds")
    before.assert_unchanged()
