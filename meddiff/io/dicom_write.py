"""Write images as DICOM a PACS and the standard's validator (``dciodvfy``) accept.

Two kinds of output, each a series written into a staging folder and renamed into place (never half-written):

- **Synthetic** (``write_synthetic_dicom``): generated images, or images from a non-DICOM file. A new study with
  no patient (de-identified as PS3.15 describes: ``PatientIdentityRemoved``, ``DeidentificationMethod`` and its
  code), ``ImageType`` DERIVED\\SECONDARY\\(AXIAL|OTHER)\\SYNTHETIC, ``ImageComments`` saying synthetic, fresh
  UIDs (``SyntheticData`` (0008,001C) is left out: the validator at hand does not know it yet). CT and MR use
  their classic image IODs with every Type 1 and 2 attribute present; other modalities become Secondary Capture
  (conversion type SYN, synthetic image).
- **Derived** (``write_derived_dicom``): the result of processing a real series (denoise, inpaint, convert with
  a template). A new series in the source's study, shaped as the source (one file per single-frame slice, or one
  multi-frame object): each is the source's header (Patient, Study, Frame of Reference, geometry and acquisition
  carried over; private tags dropped) with new Series and SOP Instance UIDs, ``ImageType`` DERIVED, the
  derivation (description, code, source image and frame) where the IOD keeps it, and the source's rescale, so
  physical units (HU for CT) survive to the source's own precision.

pydicom writes the files: highdicom builds the newer IODs (SEG, ``meddiff.io.dicom_seg``) but no classic CT or MR
image objects, and SimpleITK's writer cannot set the modules these IODs require.
"""

from __future__ import annotations

import copy
import datetime
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
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
DERIVATIONS = {"denoise": codes.DCM.Smoothing, "inpaint": codes.DCM.ImageProcessing,
               "convert": codes.DCM.ImageProcessing, "generate": codes.DCM.ImageProcessing}
# Pixel attributes the source's values no longer describe once its pixels are replaced.
_STALE_PIXEL_KEYS = ("PixelData", "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
                     "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit", "IconImageSequence",
                     "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def write_synthetic_dicom(image: Image, path: str | Path, description: str, overwrite: bool = False,
                          task: str = "generate") -> Path:
    """``path`` is a ``.dcm`` file for a 2D image, else a folder of ``slice_XXXX.dcm`` (one per slice)."""
    image.check_finite()
    if image.array.ndim not in (2, 3):
        raise MeddiffError(f"DICOM output takes 2D or 3D images, not shape {image.array.shape}")
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    planes = [image.array] if image.array.ndim == 2 else [image.array[:, :, k] for k in range(image.array.shape[2])]
    low, high = float(image.array.min()), float(image.array.max())
    datasets = [_synthetic_slice(image, plane, k, uids, description, task, low, high) for k, plane in enumerate(planes)]
    return _write(datasets, Path(path), overwrite)


def write_derived_dicom(image: Image, source: str | Path, out_dir: str | Path, description: str, task: str,
                        series: str | int | None = None, overwrite: bool = False) -> Path:
    """``image`` (on the grid of the DICOM ``source`` file or series) as a new series of the source's study, shaped
    as the source: one file per source file (single-frame slices, or a multi-frame object whose frames keep their
    order) in the folder ``out_dir``; a single source file to a ``.dcm`` path gives one file."""
    from meddiff.io.dicom import source_slices

    image.check_finite()
    slices = source_slices(Path(source), series)
    series_uid, now = generate_uid(), _now()
    number = 1000 + int(slices[0][1].get("SeriesNumber") or 0)
    datasets = [_derived_object(header, planes_on_source_grid(image, header, source), series_uid, number,
                                description, task, now) for _, header in slices]
    return _write(datasets, Path(out_dir), overwrite)


def _write(datasets: list[FileDataset], path: Path, overwrite: bool) -> Path:
    """One object to a ``.dcm`` path as a file (``atomic_path``); otherwise a folder of ``slice_XXXX.dcm``, written
    in a staging folder and renamed into place."""
    if len(datasets) == 1 and path.suffix.lower() == ".dcm":
        with atomic_path(path, overwrite) as tmp:
            datasets[0].save_as(tmp, enforce_file_format=True)
        return path
    with _staged_folder(path, overwrite) as tmp:
        for k, dataset in enumerate(datasets):
            dataset.save_as(tmp / f"slice_{k:04d}.dcm", enforce_file_format=True)
    return path


def frame_positions(header: Dataset) -> list[list[float]]:
    """``ImagePositionPatient`` of each frame: the header's own, or per frame from an enhanced object's functional
    groups (per-frame, else shared)."""
    frames = int(header.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" not in header:
        if frames > 1:
            raise MeddiffError("a multi-frame object without functional groups has no per-frame positions: "
                               "write NIfTI instead")
        return [[float(v) for v in header.ImagePositionPatient]]
    shared = header.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    positions = []
    for group in header.PerFrameFunctionalGroupsSequence:
        plane = group.get("PlanePositionSequence") or shared.get("PlanePositionSequence")
        positions.append([float(v) for v in plane[0].ImagePositionPatient])
    return positions


def planes_on_source_grid(image: Image, header: Dataset, source) -> np.ndarray:
    """The (frames, rows, columns) planes of ``image`` at the source object's frames; refused unless ``image`` is
    on the source's grid."""
    array = image.array if image.array.ndim == 3 else image.array[:, :, None]
    inverse = np.linalg.inv(image.affine)
    planes = []
    for position in frame_positions(header):
        i, j, k = inverse[:3, :3] @ (LPS_TO_RAS @ np.asarray(position)) + inverse[:3, 3]
        index = round(k)
        if abs(i) > 1e-2 or abs(j) > 1e-2 or abs(k - index) > 1e-2 or not 0 <= index < array.shape[2]:
            raise MeddiffError(f"the result is not on the grid of {source}: DICOM output derives from the source "
                               "series the image was read from")
        plane = array[:, :, index].T
        if plane.shape != (int(header.Rows), int(header.Columns)):
            raise MeddiffError(f"the result's slices are {plane.shape}, the source's {header.Rows} x {header.Columns}")
        planes.append(plane)
    return np.stack(planes)


def _derived_object(header: Dataset, planes: np.ndarray, series_uid: str, number: int, description: str, task: str,
                    now: datetime.datetime) -> FileDataset:
    """A copy of the source object's header with the derived pixels, new UIDs and the derivation recorded: at the
    top level for a single-frame object, in each frame's Derivation Image functional group for a multi-frame one
    (where the enhanced IODs keep it)."""
    ds = copy.deepcopy(header)
    ds.remove_private_tags()
    for key in _STALE_PIXEL_KEYS:
        if key in ds:
            delattr(ds, key)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, number
    ds.SeriesDescription = f"{header.get('SeriesDescription', '')} meddiff {task}".strip()[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    if "PerFrameFunctionalGroupsSequence" in ds:
        # enhanced IODs: value 2 of Image and Frame Type is enumerated (the source's stays), value 1 says DERIVED
        ds.ImageType = ["DERIVED", *list(header.ImageType)[1:]]
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        for frame, group in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1):
            group.DerivationImageSequence = [_derivation(header, description, task, frame)]
            for holder in (group, shared):
                for key in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
                    for item in holder.get(key, []):
                        item.FrameType = ["DERIVED", *list(item.FrameType)[1:]]
        ds.SourceImageEvidenceSequence = [_evidence(header)]
        transform = (ds.PerFrameFunctionalGroupsSequence[0].get("PixelValueTransformationSequence")
                     or shared.get("PixelValueTransformationSequence") or [header])[0]
        scale, written = transform, False  # the functional groups keep the rescale
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", *list(header.get("ImageType", []))[2:]]
        ds.update(_derivation(header, description, task))  # description, code and source image, at the top level
        scale, written = header, "RescaleSlope" in header or header.SOPClassUID != MRImageStorage
    slope, intercept = float(scale.get("RescaleSlope", 1)), float(scale.get("RescaleIntercept", 0))
    _set_pixels(ds, planes if len(planes) > 1 else planes[0], slope, intercept, written)
    return _file_dataset(ds)


def _evidence(header: Dataset) -> Dataset:
    """A hierarchical reference (study, series, instance) to the source object."""
    instance, series, study = Dataset(), Dataset(), Dataset()
    instance.ReferencedSOPClassUID, instance.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    series.SeriesInstanceUID, series.ReferencedSOPSequence = header.SeriesInstanceUID, [instance]
    study.StudyInstanceUID, study.ReferencedSeriesSequence = header.StudyInstanceUID, [series]
    return study


def _derivation(header: Dataset, description: str, task: str, frame: int | None = None) -> Dataset:
    """A Derivation Image item: what was done and the source image (and frame) it was done to."""
    source = Dataset()
    source.ReferencedSOPClassUID, source.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
    if frame is not None:
        source.ReferencedFrameNumber = frame
        source.PurposeOfReferenceCodeSequence = [_code(codes.DCM.SourceImageForImageProcessingOperation)]
    item = Dataset()
    item.DerivationDescription = description[:1024]
    item.DerivationCodeSequence = [_code(DERIVATIONS[task])]
    item.SourceImageSequence = [source]
    return item


def _synthetic_slice(image: Image, plane: np.ndarray, k: int, uids: dict[str, str], description: str, task: str,
                     low: float, high: float) -> FileDataset:
    modality = (image.modality or "OT").upper()
    sop_class = SOP_CLASSES.get(modality, SecondaryCaptureImageStorage)
    now = _now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    # Patient: none. Type 2 attributes present and empty; de-identified as PS3.15 describes.
    ds.PatientName, ds.PatientID = "Synthetic^meddiff", "SYNTHETIC"
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "meddiff synthetic image: no patient"
    ds.DeidentificationMethodCodeSequence = [_code(codes.DCM.BasicApplicationConfidentialityProfile)]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
    ds.StudyDescription = "meddiff synthetic"
    ds.Modality = modality
    ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
    ds.SeriesDescription = f"meddiff {task}"
    ds.Laterality = ""
    ds.Manufacturer = "meddiff"
    ds.SoftwareVersions = __version__
    ds.ImageComments = "synthetic image made by meddiff: no patient, no acquisition"
    ds.BurnedInAnnotation = "NO"
    ds.ImageType = ["DERIVED", "SECONDARY", _image_type_3(image, modality), "SYNTHETIC"]  # value 4: ours to use
    _mark_derivation(ds, description, task)
    if sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "SYN"  # synthetic image
        ds.PatientOrientation = ""
        rescaled = False
    else:
        _geometry(ds, image, k, uids["frame"])
        if modality == "CT":
            ds.KVP = ds.AcquisitionNumber = ""
        else:
            ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"  # research mode: no acquisition at all
            ds.ScanOptions = ds.RepetitionTime = ds.EchoTime = ds.EchoTrainLength = ""
            ds.MRAcquisitionType = "2D" if image.array.ndim == 2 else "3D"
        # CT keeps HU (the CT IOD rescales); MR stores its own units unless a narrow range needs a rescale
        rescaled = modality == "CT"
    slope, intercept = (1.0, 0.0) if rescaled or high - low >= 255 else ((high - low) / 65535.0 or 1.0, low)
    _set_pixels(ds, plane.T, slope, intercept, rescaled or slope != 1.0, low=low)
    return _file_dataset(ds)


def _image_type_3(image: Image, modality: str) -> str:
    """Value 3 of ``ImageType`` (required for CT and MR): AXIAL for CT slices across the body axis, else OTHER."""
    normal = image.affine[:3, 2] / (np.linalg.norm(image.affine[:3, 2]) or 1.0)
    return "AXIAL" if modality == "CT" and image.array.ndim == 3 and abs(normal[2]) > 0.9 else "OTHER"


def _geometry(ds: Dataset, image: Image, k: int, frame_uid: str) -> None:
    """Frame of reference, position and orientation (LPS, as DICOM has it) of slice ``k``."""
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
    ds.PatientPosition = ""
    lps = LPS_TO_RAS @ image.affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*(lps[:, 0] / spacing[0]), *(lps[:, 1] / spacing[1]))]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in LPS_TO_RAS @ (image.affine[:3, 3] + image.affine[:3, 2] * k)]
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # rows (j) then columns (i)
    ds.SliceThickness = f"{spacing[2]:.6f}"


def _mark_derivation(ds: Dataset, description: str, task: str) -> None:
    ds.DerivationDescription = description[:1024]
    ds.DerivationCodeSequence = [_code(DERIVATIONS[task])]


def _code(code) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def _set_pixels(ds: Dataset, rows_cols: np.ndarray, slope: float, intercept: float, rescaled: bool,
                low: float | None = None) -> None:
    """Stored values ``round((value - intercept) / slope)`` in 16 bits, unsigned unless some are negative; the
    scale is kept (the source's, so every value it can represent comes back exactly) and values beyond the 16 bits
    at that scale (for CT at intercept -1024: beyond -33792..31743 HU) are clipped."""
    low = float(rows_cols.min()) if low is None else low
    stored = np.round((rows_cols.astype(np.float64) - intercept) / slope)
    signed = round((low - intercept) / slope) < 0
    stored = stored.clip(-32768 if signed else 0, 32767 if signed else 65535).astype(np.int16 if signed else np.uint16)
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(signed)
    for key in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
        if key in ds:
            delattr(ds, key)
    if rescaled:
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    ds.PixelData = stored.tobytes()


def _file_dataset(ds: Dataset) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return FileDataset(None, ds, file_meta=meta, preamble=b"\0" * 128)


def _now() -> datetime.datetime:
    return datetime.datetime.now()


@contextmanager
def _staged_folder(path: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden sibling folder to write a series into, renamed to ``path`` when complete; removed on any failure.
    Unlike ``meddiff.data.staging.staged_folder`` (which keeps an existing folder's other files), an overwritten
    series folder is replaced whole: stale slices of an earlier series must not stay beside the new one."""
    if path.exists() and not overwrite:
        raise MeddiffError(f"{path} already exists — choose another output or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    _remove(tmp)
    try:
        tmp.mkdir()
        yield tmp
        _remove(path)
        tmp.rename(path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()

