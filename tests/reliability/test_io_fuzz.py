"""Bounded fuzz of the NIfTI and DICOM readers: mutated header bytes, absurd header fields and truncations
of small real files. Property: ``load_image`` returns a finite image of 2-4 axes, or raises MeddiffError
(one sentence for the user) — never another exception, never a hang.

The budget is ``MEDDIFF_FUZZ_EXAMPLES`` examples per test (default 40, so ``make test`` stays fast);
a longer hunt: ``MEDDIFF_FUZZ_EXAMPLES=2000 python -m pytest -m fuzz tests/reliability/test_io_fuzz.py``.
The examples are the same on every run (derandomized, no example database written) unless
``MEDDIFF_FUZZ_RANDOM=1`` asks for fresh ones.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.data
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meddiff.errors import MeddiffError
from meddiff.io import load_image

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("MEDDIFF_FUZZ_EXAMPLES", "40"))
SECONDS_PER_EXAMPLE = 20  # a read of these small files takes milliseconds: anything near this is a hang
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MEDDIFF_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@functools.cache
def originals() -> dict[str, bytes]:
    """Small real files: a 12x12x4 crop of dipy's oblique, anisotropic brain volume (its own int16 header
    and scaling) as .nii and .nii.gz, and pydicom's CT and MR slices. (A cached function, not a fixture,
    so that hypothesis does not print every file's bytes with a failing example.)"""
    from dipy.data import get_fnames

    real = nib.load(get_fnames(name="aniso_vox"))
    crop = nib.Nifti1Image(np.asarray(real.dataobj)[20:32, 20:32, 10:14], real.affine, header=real.header)
    files = {}
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".nii", ".nii.gz"):
            nib.save(crop, Path(folder) / f"crop{suffix}")
            files[suffix] = (Path(folder) / f"crop{suffix}").read_bytes()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        files[name] = Path(pydicom.data.get_testdata_file(name)).read_bytes()
    return files


@contextmanager
def time_limit(seconds: int):
    def hung(signum, frame):
        raise TimeoutError(f"load_image still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_load(path: Path) -> None:
    """The property: a finite, sensible image, or a MeddiffError naming the file; nothing else, and no
    warnings from the readers on the way (pydicom's would be dozens of lines on the user's terminal)."""
    with time_limit(SECONDS_PER_EXAMPLE), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path)
        except MeddiffError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            assert len(str(exc)) < 600 and not str(exc).rstrip().endswith(":"), f"not one readable sentence: {exc!r}"
            return
        finally:
            assert not caught, [str(w.message)[:200] for w in caught]
    assert image.array.ndim in (2, 3, 4) and min(image.array.shape) >= 1
    assert np.isfinite(image.array).all() and np.isfinite(image.affine).all()


def pixel_data_offset(data: bytes) -> int:
    """Where a DICOM file's (7FE0,0010) PixelData element starts: the header is everything before it."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    return at if at > 0 else len(data)


SOURCES = (".nii", ".nii.gz", "CT_small.dcm", "MR_small.dcm")
# NIfTI-1 header fields worth pushing to extremes: dim[0..7], datatype, bitpix, vox_offset, scl_slope/inter,
# q/sform codes
NIFTI_FIELDS = {"dim": (40, "<8h"), "datatype": (70, "<h"), "bitpix": (72, "<h"), "vox_offset": (108, "<f"),
                "scl": (112, "<2f"), "qform_code": (252, "<h"), "sform_code": (254, "<h"), "pixdim": (76, "<8f")}
EXTREMES = st.sampled_from([0, 1, -1, 2, 7, 8, 255, 32767, -32768])
FLOATS = st.one_of(st.sampled_from([0.0, -1.0, 1e38, -1e38, float("nan"), float("inf"), 1e-38]), st.floats(width=32))


@st.composite
def mutations(draw):
    source = draw(st.sampled_from(SOURCES))
    kind = draw(st.sampled_from(["header bytes", "truncate", "field"] if source.startswith(".nii")
                                else ["header bytes", "truncate"]))
    return source, kind, draw(st.data())


def mutate(data: bytes, source: str, kind: str, draw) -> bytes:
    if kind == "truncate":
        return data[: draw.draw(st.integers(0, len(data) - 1), label="cut at")]
    if source == ".nii.gz":  # mutate the NIfTI header inside the gzip stream, as a corrupt writer would
        import gzip

        return gzip.compress(mutate(gzip.decompress(data), ".nii", kind, draw), mtime=0)
    if kind == "field":
        offset, fmt = NIFTI_FIELDS[draw.draw(st.sampled_from(sorted(NIFTI_FIELDS)), label="field")]
        count = struct.calcsize(fmt) // struct.calcsize(fmt[-1])
        values = [draw.draw(FLOATS if fmt.endswith("f") else EXTREMES) for _ in range(count)]
        buf = bytearray(data)
        struct.pack_into(fmt, buf, offset, *values)
        return bytes(buf)
    header_end = 352 if source == ".nii" else pixel_data_offset(data)
    buf = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 8), label="bytes changed")):
        buf[draw.draw(st.integers(0, header_end - 1))] = draw.draw(st.integers(0, 255))
    return bytes(buf)


@FUZZ
@given(case=mutations())
def test_mutated_real_files_load_or_fail_in_one_sentence(case, tmp_path):
    source, kind, draw = case
    data = mutate(originals()[source], source, kind, draw)
    path = tmp_path / ("fuzz" + (source if source.startswith(".nii") else ".dcm"))
    path.write_bytes(data)
    check_load(path)


@FUZZ
@given(source=st.sampled_from(SOURCES), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_real_files_load_or_fail_in_one_sentence(source, cut, tmp_path):
    data = originals()[source]
    path = tmp_path / ("cut" + (source if source.startswith(".nii") else ".dcm"))
    path.write_bytes(data[: int(len(data) * cut)])
    check_load(path)


def test_the_originals_load(tmp_path):
    """The fuzz starts from files the readers accept."""
    for source, data in originals().items():
        path = tmp_path / ("orig" + (source if source.startswith(".nii") else ".dcm"))
        path.write_bytes(data)
        assert load_image(path).array.size > 0
