"""DICOM: single files (incl. multi-frame and enhanced CT/MR) and series in a folder.

pydicom reads the headers (grouping by SeriesInstanceUID, sorting by position, modality,
photometric interpretation); SimpleITK/GDCM decodes pixels, applies rescale slope/intercept (CT in
Hounsfield units), inverts MONOCHROME1 radiographs to MONOCHROME2 (larger = brighter) and computes
the geometry, so meddiff's geometry is SimpleITK's by construction. Tests pin each of these.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from meddiff.errors import MeddiffError
from meddiff.image import SAFE_META_KEYS, Image
from meddiff.io.itk import first_error_line, sitk_to_array_affine

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
    if path.is_dir():
        return _read_series(_choose_series(find_series(path), path, series))
    header = _read_header(path)
    if header is None:
        raise MeddiffError(f"{path} is not a DICOM image file")
    return _read_files([path], header)


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
        placed = sorted(((_slice_position(h), p, h) for p, h in members), key=lambda m: m[0])
        first = placed[0][2]
        number = first.get("SeriesNumber")
        found.append(
            Series(
                uid=uid,
                number=int(number) if number not in (None, "") else None,
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
        raise MeddiffError(f"{folder} holds {len(found)} series — choose one with series=UID or number: {listing}")
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
    try:
        if len(files) == 1:
            img = sitk.ReadImage(str(files[0]))
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in files])
            img = reader.Execute()
    except RuntimeError as exc:
        raise MeddiffError(f"cannot decode DICOM pixels of {files[0]}: {first_error_line(exc)}") from None
    array, affine = sitk_to_array_affine(img)
    array = array.astype(np.float32)
    if array.ndim == 3 and array.shape[2] == 1:  # one frame: a 2D image (the affine keeps the normal)
        array = array[:, :, 0]
    meta = _safe_meta(header)
    if "PhotometricInterpretation" in meta:  # GDCM has already inverted MONOCHROME1 pixels
        meta["PhotometricInterpretation"] = "MONOCHROME2"
    return Image(array=array, affine=affine, modality=str(header.get("Modality", "OT")) or None, meta=meta)


def _read_header(path: Path) -> pydicom.Dataset | None:
    """The header of a DICOM image file; None for non-DICOM files and DICOMDIR indexes."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, IsADirectoryError):
        return None
    except Exception as exc:  # truncated or corrupt header
        raise MeddiffError(f"cannot read DICOM {path}: {exc}") from None
    if ds.get("SOPClassUID") == DICOMDIR_CLASS or "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return None
    return ds


def _slice_position(ds: pydicom.Dataset) -> float:
    """Distance along the slice normal (ImagePositionPatient . normal); InstanceNumber if absent."""
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None:
        return float(ds.get("InstanceNumber") or 0)
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    return float(np.dot(normal, np.array(ipp, float)))


def _safe_meta(ds: pydicom.Dataset) -> dict:
    meta = {}
    for key in SAFE_META_KEYS:
        if key == "SOPClassName":
            if "SOPClassUID" in ds:
                meta[key] = str(ds.SOPClassUID.name)
            continue
        value = ds.get(key)
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
