"""Reading and writing medical images; the format is chosen by suffix (or content, for DICOM)."""

from __future__ import annotations

import os
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import full_suffix
from meddiff.image import Image
from meddiff.io.dicom import is_dicom_file, read_dicom
from meddiff.io.guard import readers_quiet
from meddiff.io.itk import picture_plane, read_itk, write_itk
from meddiff.io.nifti import read_nifti, write_nifti

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
READ_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES + DICOM_SUFFIXES
WRITE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + PICTURE_SUFFIXES
SYNTHETIC_FORMATS = ("nii.gz", "png", "dcm")  # what `meddiff generate --format` writes (dcm: marked synthetic)

# DICOM's defined terms for (0008,0060) that meddiff's images come in (PS3.3 C.7.3.1.1.1)
MODALITIES = ("CT", "MR", "CR", "DX", "RG", "XA", "MG", "PT", "NM", "US", "OT", "SEG")

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "load_image", "save_image"]


def is_dicom_path(path: str | os.PathLike) -> bool:
    """Whether ``load_image`` reads ``path`` as DICOM: a folder (a series), a DICOM suffix, or a file of no
    known suffix that holds DICOM."""
    path = Path(path)
    suffix = full_suffix(path)
    return path.is_dir() or suffix in DICOM_SUFFIXES or (suffix not in READ_SUFFIXES and is_dicom_file(path))


def load_image(path: str | os.PathLike, series: str | int | None = None, modality: str | None = None) -> Image:
    """Read NIfTI, DICOM (file, or a folder holding a series), MHA/NRRD or PNG/JPEG into an ``Image``.

    ``series`` picks one series (UID or SeriesNumber) when a folder holds several; ``modality``
    overrides or supplies the modality (NIfTI, MHA and pictures carry none).
    """
    path = Path(path)
    if not path.exists():
        raise MeddiffError(f"{path} does not exist")
    suffix = full_suffix(path)
    if path.is_file() and path.stat().st_size == 0:
        raise MeddiffError(f"{path} is empty (0 bytes) — copy or export it again")
    try:
        with readers_quiet():
            if is_dicom_path(path):
                image = read_dicom(path, series=series)
            elif suffix in NIFTI_SUFFIXES:
                image = read_nifti(path)
            elif suffix in ITK_SUFFIXES + PICTURE_SUFFIXES:
                image = read_itk(path)
            else:
                raise MeddiffError(f"{path}: unsupported format '{suffix}' — meddiff reads {', '.join(READ_SUFFIXES)} "
                                   "and DICOM folders")
            if modality is not None:
                image.modality = checked_modality(modality, image.modality, path)
            return image.check_finite()
    except MeddiffError as exc:  # every reading error names the file, whichever layer raised it
        if str(path) in str(exc):
            raise
        raise MeddiffError(f"{path}: {exc}") from None


def checked_modality(given: str, own: str | None, path: Path) -> str:
    """The modality a user names for a file: a DICOM defined term, and not one that contradicts the file's header."""
    given = given.upper()
    if given not in MODALITIES:
        raise MeddiffError(f"modality {given!r} is not one meddiff knows — use one of {', '.join(MODALITIES)}")
    if own and own.upper() not in ("OT", given):
        raise MeddiffError(f"{path} is {own} by its own header, not {given} — leave --modality out for this file")
    return given


def save_image(image: Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``image`` by suffix (NIfTI, MHA/NRRD, PNG/JPEG); atomic, never replaces without ``overwrite``."""
    path = Path(path)
    suffix = full_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise MeddiffError(f"{path}: cannot write '{suffix}' — meddiff writes {', '.join(WRITE_SUFFIXES)}")
    image.check_finite()
    if suffix in PICTURE_SUFFIXES:
        picture_plane(image.array, path)  # refuse a volume before any file is created
    from meddiff.outputs import locked_atomic_path

    with locked_atomic_path(path, overwrite=overwrite) as tmp:
        if suffix in NIFTI_SUFFIXES:
            write_nifti(image, tmp)
        else:
            write_itk(image, tmp, suffix)
    return path
