"""Write generated images as DICOM marked DERIVED and synthetic, with fresh UIDs and no patient.

A 2D image becomes one file; a 3D image becomes a folder with one file per slice (a series).
pydicom writes the files: SimpleITK's DICOM writer cannot mark them synthetic or set the SOP class.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from meddiff import __version__
from meddiff.errors import MeddiffError
from meddiff.files import atomic_path
from meddiff.image import Image
from meddiff.io.itk import LPS_TO_RAS

SOP_CLASSES = {"MR": MRImageStorage, "CT": CTImageStorage}


def write_synthetic_dicom(image: Image, path: str | Path, description: str, overwrite: bool = False) -> Path:
    """``path`` is a ``.dcm`` file for 2D images, or a folder of ``slice_XXXX.dcm`` for 3D images."""
    image.check_finite()
    path = Path(path)
    if image.array.ndim == 2:
        with atomic_path(path, overwrite=overwrite) as tmp:
            _slice_dataset(image, image.array, 0, _series_uids(), description).save_as(tmp, enforce_file_format=True)
        return path
    if image.array.ndim != 3:
        raise MeddiffError(f"DICOM output takes 2D or 3D images, not shape {image.array.shape}")
    if path.exists() and not overwrite:
        raise MeddiffError(f"{path} already exists — choose another output or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        tmp_dir.mkdir()
        uids = _series_uids()
        for k in range(image.array.shape[2]):
            dataset = _slice_dataset(image, image.array[:, :, k], k, uids, description)
            dataset.save_as(tmp_dir / f"slice_{k:04d}.dcm", enforce_file_format=True)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        tmp_dir.rename(path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def _series_uids() -> dict[str, str]:
    return {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}


def _slice_dataset(image: Image, plane: np.ndarray, k: int, uids: dict[str, str], description: str) -> FileDataset:
    modality = (image.modality or "OT").upper()
    sop_class = SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["frame"]
    today = datetime.date.today().strftime("%Y%m%d")
    ds.ContentDate = ds.SeriesDate = ds.StudyDate = today
    ds.Modality = modality
    ds.ImageType = ["DERIVED", "SECONDARY", "SYNTHETIC"]
    ds.DerivationDescription = description[:1024]
    ds.SeriesDescription = "meddiff synthetic"
    ds.Manufacturer = "meddiff"
    ds.SoftwareVersions = __version__
    ds.PatientName = "SYNTHETIC"
    ds.PatientID = "SYNTHETIC"
    ds.PatientIdentityRemoved = "YES"
    ds.BurnedInAnnotation = "NO"
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    lps = LPS_TO_RAS @ image.affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(lps[:, 0] / spacing[0]), *(lps[:, 1] / spacing[1]))]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in LPS_TO_RAS @ (image.affine[:3, 3] + image.affine[:3, 2] * k)]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # rows (j) then columns (i)
    ds.SliceThickness = f"{spacing[2]:.6f}"
    _set_pixels(ds, plane.T, modality, float(image.array.min()), float(image.array.max()))
    return ds


def _set_pixels(ds: pydicom.Dataset, rows_cols: np.ndarray, modality: str, low: float, high: float) -> None:
    """CT as int16 Hounsfield units; other modalities' whole numbers as they are (uint16 in 0..65535, else
    int16 in -32768..32767: a scan read from DICOM is written back exactly), anything else as uint16 with a
    rescale that keeps the range."""
    whole = np.array_equal(rows_cols, np.round(rows_cols))
    if modality == "CT" or (whole and low < 0 and -32768 <= low and high <= 32767):
        stored = np.clip(np.round(rows_cols), -32768, 32767).astype(np.int16)
        slope, intercept, signed = 1.0, 0.0, 1
    elif whole and 0 <= low and high <= 65535:
        stored = rows_cols.astype(np.uint16)
        slope, intercept, signed = 1.0, 0.0, 0
    else:
        slope = (high - low) / 65535.0 or 1.0
        intercept = low
        stored = np.round((rows_cols - intercept) / slope).clip(0, 65535).astype(np.uint16)
        signed = 0
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = signed
    ds.RescaleSlope = f"{slope:.10g}"
    ds.RescaleIntercept = f"{intercept:.10g}"
    ds.PixelData = stored.tobytes()
