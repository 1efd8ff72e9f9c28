"""Build a manifest from a folder of images: one record per file or DICOM series.

Splits are by patient when asked: a salted SHA-256 of the PatientID (DICOM) or of a subject key
taken from the path decides the split, so no patient lands in two splits; only the hash is kept.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import os
import re
import secrets
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from meddiff.data.manifest import Record
from meddiff.errors import MeddiffError
from meddiff.files import full_suffix, stem
from meddiff.io import ITK_SUFFIXES, MODALITIES, NIFTI_SUFFIXES, PICTURE_SUFFIXES
from meddiff.io.dicom import find_series

FILE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES


def build_records(
    folder: str | os.PathLike,
    manifest_dir: str | os.PathLike,
    modality: str | None = None,
    reports_csv: str | os.PathLike | None = None,
    split_by: str = "patient",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    salt: str | None = None,
    seed: int = 0,
    subject_pattern: str | None = None,
    source: str | None = None,
    allow_ids_in_paths: bool = False,
    include: str | None = None,
) -> list[Record]:
    """Records for every image under ``folder``, with paths relative to ``manifest_dir``.

    A DICOM PatientID or PatientName that appears in a record's path or source is an error (the
    manifest would expose it) unless ``allow_ids_in_paths`` (for public datasets whose IDs are
    already pseudonyms, such as LIDC-IDRI).
    """
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise MeddiffError(f"{folder} is not a folder")
    if modality is not None and modality.upper() not in MODALITIES:
        raise MeddiffError(f"--modality {modality!r} is not a modality meddiff knows — use one of "
                           f"{', '.join(MODALITIES)}")
    if split_by not in ("patient", "random"):
        raise MeddiffError(f"--split-by must be 'patient' or 'random', not {split_by!r}")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise MeddiffError(f"val and test fractions must be >= 0 and sum to less than 1, not {val_fraction} and "
                           f"{test_fraction} — give --val-fraction and --test-fraction such as 0.1")
    salt = salt if salt is not None else secrets.token_hex(16)
    pattern = _subject_regex(subject_pattern) if subject_pattern else None
    reports = _read_reports(reports_csv) if reports_csv else {}
    source = source or folder.name
    found = []  # (record fields, subject key, report keys)
    for series in find_series(folder):
        header = series.header
        if len(series.files) == 1:
            image, uid = series.files[0], None
        else:
            image, uid = Path(os.path.commonpath(series.files)), series.uid
        rel = image.relative_to(folder)
        identifiers = [str(header.get(k) or "") for k in ("PatientID", "PatientName")]
        exposed = [i for i in identifiers if len(i) >= 3 and (i in rel.as_posix() or i in source)]
        if exposed and not allow_ids_in_paths:
            raise MeddiffError(
                f"the path of {rel.as_posix()} or the source name contains its patient's "
                f"{('ID', 'name')[identifiers.index(exposed[0])]}: "
                "a manifest would expose it — rename the folders to pseudonyms, pass --source, or, for public "
                "pseudonymised data, --allow-ids-in-paths"
            )
        subject = identifiers[0] or _subject_from_path(rel, pattern)
        for file in series.files:
            _check_complete(file, folder)
        found.append((dict(image=image, series=uid, modality=series.modality, spacing=_dicom_spacing(series.files)),
                      subject, rel))
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        hidden = any(part.startswith(".") for part in rel.parts)  # meddiff's temporaries and staging folders
        wanted = include is None or fnmatch.fnmatch(rel.as_posix(), include)
        if wanted and not hidden and path.is_file() and full_suffix(path) in FILE_SUFFIXES:
            if modality is None:
                raise MeddiffError(f"cannot tell the modality of {path} — pass --modality MR|CT|CR|DX")
            _check_complete(path, folder)
            found.append((dict(image=path, modality=modality.upper(), spacing=_header_spacing(path)),
                          _subject_from_path(rel, pattern), rel))
    if not found:
        raise MeddiffError(f"no images found under {folder}")
    rng = np.random.default_rng(seed)
    manifest_dir = Path(manifest_dir).resolve()
    records = []
    for fields, subject, rel in found:
        digest = hashlib.sha256(f"{salt}:{subject}".encode()).hexdigest()[:16]
        u = int(digest, 16) / 16**16 if split_by == "patient" else rng.random()
        split = "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        report = next((reports[k] for k in _report_keys(rel) if k in reports), None)
        image = Path(os.path.relpath(fields.pop("image"), manifest_dir)).as_posix()
        records.append(Record(image=image, split=split, report=report, subject=digest, source=source, **fields))
    return records


def _check_complete(path: Path, folder: Path) -> None:
    """Refuse a truncated file, from its header and size alone (no pixel data decoded).

    NIfTI: the header's data offset plus shape x item size against the file's (for .nii.gz the
    uncompressed) size. DICOM, uncompressed transfer syntaxes: Rows x Columns x frames x samples x
    bits against the pixel data the file holds. Other formats are checked when they are read.
    """
    try:
        if full_suffix(path) in NIFTI_SUFFIXES:
            expected, held = _nifti_sizes(path)
        elif full_suffix(path) in FILE_SUFFIXES:
            return
        else:
            expected, held = _dicom_pixel_sizes(path)
    except Exception as exc:  # noqa: BLE001 - nibabel and pydicom raise many types on damaged headers
        raise MeddiffError(f"{path.relative_to(folder).as_posix()} cannot be read ({exc}) "
                           f"— copy it again or move it out of {folder}") from None
    if held < expected:
        raise MeddiffError(
            f"{path.relative_to(folder).as_posix()} is truncated: its header promises {expected} bytes, "
            f"the file holds {held} — copy it again or move it out of {folder}"
        )


def _nifti_sizes(path: Path) -> tuple[int, int]:
    """(bytes the header promises, bytes the file holds), uncompressed."""
    proxy = nib.load(str(path)).dataobj
    expected = int(proxy.offset + np.prod(proxy.shape, dtype=np.int64) * proxy.dtype.itemsize)
    if full_suffix(path) != ".nii.gz":
        return expected, path.stat().st_size
    with open(path, "rb") as fh:  # gzip's trailer holds the uncompressed size mod 2**32: one seek in the usual case
        fh.seek(-4, os.SEEK_END)
        if int.from_bytes(fh.read(4), "little") == expected % 2**32:
            return expected, expected
    return expected, _gunzipped_size(path)


def _gunzipped_size(path: Path) -> int:
    """Bytes that really decompress from a gzip file (several members, a truncated end), in bounded memory.

    By hand because ``gzip`` raises at a truncated end without saying how much came before it.
    """
    held, gz = 0, zlib.MAX_WBITS | 16
    with open(path, "rb") as fh:
        inflate, data = zlib.decompressobj(gz), fh.read(1 << 20)
        try:
            while data:
                held += len(inflate.decompress(data, 1 << 22))
                if inflate.eof:  # another member may follow
                    data, inflate = inflate.unused_data or fh.read(1 << 20), zlib.decompressobj(gz)
                else:
                    data = inflate.unconsumed_tail or fh.read(1 << 20)
            held += len(inflate.flush())
        except zlib.error:  # garbage after the last member, or a damaged stream: what came before counts
            pass
    return held


def _dicom_pixel_sizes(path: Path) -> tuple[int, int]:
    """(pixel bytes the header promises, pixel bytes the file holds) of an uncompressed DICOM image;
    (0, 0) if compressed."""
    # large values are skipped, not read: the pixel data's offset and length stay
    ds = pydicom.dcmread(path, defer_size=1024)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and (syntax.is_compressed or syntax.is_deflated):  # sizes in the file are not pixel counts
        return 0, 0
    try:
        # chroma halved
        samples = 2 if ds.get("PhotometricInterpretation") == "YBR_FULL_422" else int(ds.get("SamplesPerPixel") or 1)
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1) * samples
                    * int(ds.get("BitsAllocated") or 8) // 8)
    except (TypeError, ValueError):  # a malformed size field: reading the image will say what is wrong
        return 0, 0
    if "PixelData" not in ds:
        return (0, 0) if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else (expected, 0)
    element = ds.get_item(0x7FE00010, keep_deferred=True)
    if element.value_tell is None:  # read in full (small): its length is what the file held
        return expected, len(element.value)
    return expected, min(element.length, path.stat().st_size - element.value_tell)


def _subject_regex(text: str) -> re.Pattern:
    """``--subject-pattern`` compiled, or one line saying what is wrong with it (before the folder is scanned)."""
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as exc:  # re raises the last two for absurd repeats / nesting
        raise MeddiffError(f"--subject-pattern {text!r} is not a valid regular expression ({exc}) — fix it, e.g. "
                           r"'sub-(\w+)' (its first group is the subject)") from None


def _subject_from_path(rel: Path, pattern: re.Pattern | None) -> str:
    """Subject key: the pattern's first group, else the top folder (nested data) or the file stem."""
    if pattern is not None:
        match = pattern.search(rel.as_posix())
        if not match:
            raise MeddiffError(f"--subject-pattern does not match {rel.as_posix()}")
        return match.group(1) if match.groups() else match.group(0)
    return rel.parts[0] if len(rel.parts) > 1 else stem(rel)


def _report_keys(rel: Path) -> list[str]:
    return [rel.as_posix(), rel.name, stem(rel)]


def _read_reports(path: str | os.PathLike) -> dict[str, str]:
    """CSV with columns ``image`` (relative path, file name or stem) and ``report``."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise MeddiffError(f"cannot read reports {path}: {exc.strerror}") from None
    if not rows or not {"image", "report"} <= set(rows[0]):
        raise MeddiffError(f"reports CSV {path} needs the columns 'image' and 'report'")
    return {row["image"]: row["report"] for row in rows}


def _header_spacing(path: Path) -> list[float]:
    """Voxel spacing from the header alone (no pixel data read)."""
    if full_suffix(path) in NIFTI_SUFFIXES:
        zooms = nib.load(str(path)).header.get_zooms()
        return [float(z) for z in zooms[:3]]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return [float(s) for s in reader.GetSpacing()[:3]]


def _dicom_spacing(files: list[Path]) -> list[float] | None:
    """Spacing as SimpleITK reads it: 2 numbers for one frame, 3 for multi-frame files and series."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(files[0]))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    size, spacing = reader.GetSize(), [abs(float(s)) for s in reader.GetSpacing()]  # GDCM may sign the frame gap
    if len(files) == 1:
        return spacing[:2] if len(size) < 3 or size[2] == 1 else spacing[:3]
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    last = pydicom.dcmread(files[-1], stop_before_pixels=True)
    if "ImagePositionPatient" not in first or "ImagePositionPatient" not in last:
        return None
    gap = np.linalg.norm(np.subtract(last.ImagePositionPatient, first.ImagePositionPatient)) / (len(files) - 1)
    return spacing[:2] + [float(gap)]
