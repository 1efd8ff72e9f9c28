"""DICOM: single files (incl. multi-frame and enhanced CT/MR) and series in a folder.

pydicom reads the headers (grouping by SeriesInstanceUID, sorting by position, modality,
photometric interpretation); SimpleITK/GDCM decodes pixels, applies rescale slope/intercept (CT in
Hounsfield units), inverts MONOCHROME1 radiographs to MONOCHROME2 (larger = brighter) and computes
the geometry, so meddiff's geometry is SimpleITK's by construction. Tests pin each of these.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from meddiff.errors import MeddiffError
from meddiff.image import SAFE_META_KEYS, Image
from meddiff.io.guard import check_shape, native_stderr_captured, reason
from meddiff.io.itk import native_reason, sitk_to_array_affine

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Slices whose gaps differ by more than this (mm) do not form one regular volume.
SPACING_TOLERANCE_MM = 0.01


def is_dicom_file(path: Path) -> bool:
    """True if the file has the DICOM preamble magic (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class Series:
    """One DICOM series found in a folder: files sorted along the slice normal, with their positions
    and the first file's header (kept in memory only, never written out)."""

    uid: str
    number: int | None
    modality: str
    description: str
    files: list[Path]
    positions: list[float]
    header: pydicom.Dataset

    def summary(self) -> str:
        return f"series {self.number} ({self.modality}, {len(self.files)} files, '{self.description}'): {self.uid}"


def read_dicom(path: Path, series: str | int | None = None) -> Image:
    """A single DICOM file, or the one series (or the chosen ``series``) found under a folder."""
    from meddiff.io.dicom_seg import is_seg, read_seg

    if path.is_dir():
        chosen = _choose_series(find_series(path), path, series)
        return read_seg(chosen.files[0]) if is_seg(chosen.header) else _read_series(chosen)
    header = _read_header(path)
    if header is None:
        raise MeddiffError(f"{path} is not a DICOM image file")
    return read_seg(path) if is_seg(header) else _read_files([path], header)


def source_slices(path: Path, series: str | int | None = None) -> list[tuple[Path, pydicom.Dataset]]:
    """The files of a DICOM file or series with their headers, along the slice normal: what a derived series
    (``meddiff.io.dicom_write``) refers to, one header per output slice (kept in memory only)."""
    if not path.is_dir():
        header = _read_header(path)
        if header is None:
            raise MeddiffError(f"{path} is not a DICOM image file")
        return [(path, header)]
    chosen = _choose_series(find_series(path), path, series)
    return [(file, _read_header(file)) for file in chosen.files]


# What ties an image to one patient, study and coordinate frame: two objects that differ in any cannot be combined.
IDENTITY_KEYS = ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID")


def identity(path: Path, series: str | int | None = None) -> dict[str, str]:
    """The identity (``IDENTITY_KEYS``) and Modality of a DICOM file or series, from its first header (kept in
    memory only: these values are compared, never written anywhere)."""
    if path.is_dir():
        header = _choose_series(find_series(path), path, series).header
    else:
        header = _read_header(path)
        if header is None:
            raise MeddiffError(f"{path} is not a DICOM image file")
    return {key: str(header.get(key, "") or "") for key in (*IDENTITY_KEYS, "Modality")}


def find_series(folder: Path) -> list[Series]:
    """All image series under ``folder`` (recursive), files sorted along the slice normal."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # hidden: meddiff's temporaries and staging folders
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(root) / name
            header = _read_header(path)
            if header is not None:
                groups.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    found = []
    for uid, members in groups.items():
        placed = sorted(((_slice_position(h, p), p, h) for p, h in members), key=lambda m: m[0])
        first = placed[0][2]
        number = _number(first, "SeriesNumber", None, placed[0][1])
        found.append(
            Series(
                uid=uid,
                number=number,
                modality=str(first.get("Modality", "OT")),
                description=str(first.get("SeriesDescription", "")),
                files=[p for _, p, _ in placed],
                positions=[z for z, _, _ in placed],
                header=first,
            )
        )
    found.sort(key=lambda s: (s.number is None, s.number or 0, s.uid))
    return found


def _choose_series(found: list[Series], folder: Path, series: str | int | None) -> Series:
    if not found:
        raise MeddiffError(f"no DICOM images found under {folder}")
    if series is None:
        if len(found) == 1:
            return found[0]
        listing = "; ".join(s.summary() for s in found)
        numbers = [s.number for s in found]
        how = "its UID (their numbers repeat)" if len(set(numbers)) < len(numbers) else "its number or UID"
        raise MeddiffError(f"{folder} holds {len(found)} series — choose one with --series and {how} "
                           f"(series= from Python): {listing}")
    chosen = [s for s in found if s.uid == str(series) or (s.number is not None and str(s.number) == str(series))]
    if len(chosen) != 1:
        listing = "; ".join(s.summary() for s in found)
        what = "matches no series" if not chosen else "matches several series (use the UID)"
        raise MeddiffError(f"series {series!r} {what} under {folder}: {listing}")
    return chosen[0]


def _read_series(series: Series) -> Image:
    if len(series.files) > 1:
        gaps = np.diff(series.positions)
        if np.any(gaps <= 1e-6) or np.ptp(gaps) > SPACING_TOLERANCE_MM:
            raise MeddiffError(
                f"series {series.uid} has uneven or repeated slice positions (gaps {gaps.min():.3g} to "
                f"{gaps.max():.3g} mm): it is not one regular volume — split it or resample it first"
            )
    return _read_files(series.files, series.header)


def _read_files(files: list[Path], header: pydicom.Dataset) -> Image:
    _check_size(files, header)
    chatter: list[str] = []
    try:
        with native_stderr_captured() as chatter:
            if len(files) == 1:
                img = sitk.ReadImage(str(files[0]))
            else:
                reader = sitk.ImageSeriesReader()
                reader.SetFileNames([str(f) for f in files])
                img = reader.Execute()
    except (RuntimeError, MemoryError) as exc:
        for file in files:  # name the file at fault when pydicom can tell (a cut-off copy is the usual cause)
            _check_pixel_data(file)
        raise MeddiffError(
            "cannot decode DICOM pixels of "
            f"{files[0]}{f' (and {len(files) - 1} more files)' if len(files) > 1 else ''}: "
            f"{native_reason(chatter, exc)} — the file is corrupt or uses an encoding GDCM cannot read: "
            "convert it with dcmdjpeg/gdcmconv first"
        ) from None
    array, affine = sitk_to_array_affine(img)
    array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[2] == 1:  # one frame: a 2D image (the affine keeps the normal)
        array = array[:, :, 0]
    meta = _safe_meta(header)
    if "PhotometricInterpretation" in meta:  # GDCM has already inverted MONOCHROME1 pixels
        meta["PhotometricInterpretation"] = "MONOCHROME2"
    return Image(array=array, affine=affine, modality=str(header.get("Modality", "OT")) or None, meta=meta)


# The header values meddiff relies on; a file whose values for these cannot be parsed is refused.
_USED_KEYS = (
    "SOPClassUID", "SeriesInstanceUID", "SeriesNumber", "SeriesDescription", "Modality", "Rows", "Columns",
    "NumberOfFrames", "BitsAllocated", "SamplesPerPixel", "ImagePositionPatient", "ImageOrientationPatient",
    "InstanceNumber",
)


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM image file; None for non-DICOM files and DICOMDIR indexes."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("SOPClassUID") == DICOMDIR_CLASS or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            return None
        for key in _USED_KEYS:  # pydicom parses values lazily: a garbled header fails here, not deep in a reader
            ds.get(key)
    except (InvalidDicomError, IsADirectoryError):
        return None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt header
        raise MeddiffError(f"cannot read DICOM {path}: {reason(exc)} — the file is truncated or corrupt: "
                           "copy or export it again") from None
    return ds


def _number(ds: pydicom.Dataset, key: str, default: int | None, path: Path | None = None) -> int | None:
    """An integer header value (Rows, NumberOfFrames, ...); a garbled one is a corrupt header."""
    value = ds.get(key)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        where = f" {path}" if path else ""
        raise MeddiffError(f"cannot read DICOM{where}: {key} is {str(value)[:40]!r}, "
                           "not a number — the header is corrupt") from None


def _check_size(files: list[Path], header: pydicom.Dataset) -> None:
    """Refuse a header's absurd image size (0 rows, 60000 x 60000 x 60000 frames) before the decoder
    allocates it: uncompressed pixels cannot outnumber the files' bytes; nothing may outgrow memory."""
    first = files[0]
    shape = (_number(header, "Columns", 0, first), _number(header, "Rows", 0, first),
             _number(header, "NumberOfFrames", 1, first) * len(files))
    voxel_bytes = (max(_number(header, "BitsAllocated", 16, first) // 8, 1)
                   * max(_number(header, "SamplesPerPixel", 1, first), 1))
    try:
        syntax = header.file_meta.TransferSyntaxUID
        compressed = bool(syntax.is_compressed)
    except Exception:  # noqa: BLE001 - no or an unknown transfer syntax: no size promise to check against
        compressed = True
    available = None if compressed else sum(f.stat().st_size for f in files)
    if available is not None and math.prod(shape) * voxel_bytes > available:
        for file in files:  # name the cut-off file and how much of its pixel data is there, when pydicom can tell
            _check_pixel_data(file)
    check_shape(files[0], shape, itemsize=voxel_bytes, available=available)


def _check_pixel_data(path: Path) -> None:
    """Raise a telling error when ``path``'s uncompressed pixel data is shorter than its header says."""
    try:
        ds = pydicom.dcmread(path)
        data = ds.get("PixelData")
        if data is None:
            raise MeddiffError(f"cannot read DICOM {path}: it holds no pixel data (the file is cut off before it, "
                               "or not an image) — copy or export it again")
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            return
        expected = (
            _number(ds, "Rows", 0) * _number(ds, "Columns", 0) * _number(ds, "NumberOfFrames", 1)
            * _number(ds, "SamplesPerPixel", 1) * _number(ds, "BitsAllocated", 16) // 8
        )
    except MeddiffError:
        raise
    except Exception:  # noqa: BLE001 - only a diagnosis: the caller reports the decoder's own reason
        return
    if len(data) < expected:
        raise MeddiffError(f"cannot read DICOM {path}: it is truncated (its pixel data holds {len(data)} of the "
                           f"{expected} bytes its header promises) — copy or export it again")


def _slice_position(ds: pydicom.Dataset, path: Path) -> float:
    """Distance along the slice normal (ImagePositionPatient . normal); InstanceNumber if absent."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None:
        return float(_number(ds, "InstanceNumber", 0))
    try:
        ipp, iop = np.array(ipp, float), np.array(iop, float)
    except (TypeError, ValueError):
        ipp = iop = np.zeros(0)
    if ipp.shape != (3,) or iop.shape != (6,) or not (np.isfinite(ipp).all() and np.isfinite(iop).all()):
        raise MeddiffError(f"cannot read DICOM {path}: ImagePositionPatient/ImageOrientationPatient are not 3 and 6 "
                           "numbers — the header is corrupt")
    return float(np.dot(np.cross(iop[:3], iop[3:]), ipp))


def _safe_meta(ds: pydicom.Dataset) -> dict:
    meta = {}
    for key in SAFE_META_KEYS:
        try:
            if key == "SOPClassName":
                if "SOPClassUID" in ds:
                    meta[key] = str(ds.SOPClassUID.name)
                continue
            value = ds.get(key)
        except Exception:  # noqa: BLE001, S112
            # a garbled optional value (pydicom parses lazily) is left out, not fatal
            continue
        if value is None or value == "":
            continue
        if isinstance(value, pydicom.multival.MultiValue):
            meta[key] = [_plain(v) for v in value]
        else:
            meta[key] = _plain(value)
    return meta


def _plain(value):
    """JSON-friendly scalars from pydicom value types (DS, IS, PersonName never reach here)."""
    if isinstance(value, int):
        return int(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)
