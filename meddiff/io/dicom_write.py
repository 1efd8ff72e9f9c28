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
import functools
import logging
import math
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
from meddiff.image import Image
from meddiff.io.itk import LPS_TO_RAS

log = logging.getLogger(__name__)

SOP_CLASSES = {"MR": MRImageStorage, "CT": CTImageStorage}
DERIVATIONS = {"denoise": codes.DCM.Smoothing, "inpaint": codes.DCM.ImageProcessing,
               "convert": codes.DCM.ImageProcessing, "generate": codes.DCM.ImageProcessing,
               "edit": codes.DCM.ImageProcessing, "upsample": codes.DCM.ImageProcessing}
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
    scale = storage_scale(image.array, 1.0, 0.0, True, "a 16-bit DICOM image")  # one scale for the whole series
    datasets = [_synthetic_slice(image, plane, k, uids, description, task, float(image.array.min()), scale)
                for k, plane in enumerate(planes)]
    return _write(datasets, Path(path), overwrite)


def write_derived_dicom(image: Image, source: str | Path, out_dir: str | Path, description: str, task: str,
                        series: str | int | None = None, overwrite: bool = False, deidentify: bool = False) -> Path:
    """``image`` (on the grid of the DICOM ``source`` file or series) as a new series of the source's study, shaped
    as the source: one file per source file (single-frame slices, or a multi-frame object whose frames keep their
    order) in the folder ``out_dir``; a single source file to a ``.dcm`` path gives one file. With ``deidentify``
    the series leaves the patient's study for research export (``deidentified``)."""
    from meddiff.io.dicom import source_slices

    image.check_finite()
    slices = source_slices(Path(source), series)
    series_uid, now = generate_uid(), _now()
    number = 1000 + int(slices[0][1].get("SeriesNumber") or 0)
    scale_for = series_scale(image, source)

    low = float(image.array.min())
    datasets = [_derived_object(header, planes_on_source_grid(image, header, source), series_uid, number,
                                description, task, now, scale_for, low) for _, header in slices]
    return _write(deidentified(datasets, task) if deidentify else datasets, Path(out_dir), overwrite)


def series_scale(image: Image, source):
    """The stored rescale for a source rescale ``(slope, intercept, can_rescale)``: chosen on the whole result, once
    per source rescale, so every object of a series with one source rescale gets the same one (readers take a
    series' pixel type from its first file)."""

    @functools.cache
    def scale_for(slope: float, intercept: float, can_rescale: bool) -> tuple[float, float]:
        return storage_scale(image.array, slope, intercept, can_rescale, f"the source {source}")

    return scale_for


def write_resampled_dicom(image: Image, source: str | Path, out_dir: str | Path, description: str, task: str,
                          series: str | int | None = None, overwrite: bool = False, deidentify: bool = False) -> Path:
    """``image``, the DICOM series ``source`` with new slices along its slice direction (``meddiff upsample``), as a
    new series of the source's study: one file per new slice, each the header of the nearest acquired slice with
    its own position, instance number, thickness and spacing, and both acquired slices it lies between as its
    source images. The in-plane grid, the first slice and the slice direction must be the source's."""
    from meddiff.io.dicom import source_slices

    image.check_finite()
    slices = source_slices(Path(source), series)
    headers = [header for _, header in slices]
    if any(int(h.get("NumberOfFrames") or 1) > 1 for h in headers) or len(headers) < 2:
        raise MeddiffError(f"{source} is not a series of single-frame slices: new slices are written as a series "
                           "of them — write NIfTI (-o OUT.nii.gz) instead")
    array = image.array if image.array.ndim == 3 else image.array[:, :, None]
    lps = LPS_TO_RAS @ image.affine[:3, :3]
    first = np.asarray([float(v) for v in headers[0].ImagePositionPatient])
    normal = np.cross(*np.asarray([float(v) for v in headers[0].ImageOrientationPatient]).reshape(2, 3))
    along = [float(normal @ np.asarray([float(v) for v in h.ImagePositionPatient])) for h in headers]
    step = float(np.linalg.norm(lps[:, 2]))
    origin = LPS_TO_RAS @ image.affine[:3, 3]
    if (np.abs(origin - first).max() > 1e-2 or abs(abs(float(normal @ lps[:, 2])) - step) > 1e-3 * step
            or (array.shape[1], array.shape[0]) != (int(headers[0].Rows), int(headers[0].Columns))):
        raise MeddiffError(f"the result ({image.grid}) does not add slices along the slice direction of {source}: "
                           "write NIfTI instead")
    series_uid, now = generate_uid(), _now()
    number = 1000 + int(headers[0].get("SeriesNumber") or 0)
    scale_for = series_scale(image, source)

    low, datasets = float(array.min()), []
    for k in range(array.shape[2]):
        position = origin + lps[:, 2] * k
        where = float(normal @ position)
        neighbours = sorted(range(len(along)), key=lambda i: abs(along[i] - where))[:2]  # the nearest first
        ds = _derived_object(headers[neighbours[0]], array[:, :, k].T[None], series_uid, number, description, task,
                             now, scale_for, low)
        ds.SourceImageSequence = [_derivation(headers[i], description, task).SourceImageSequence[0]
                                  for i in sorted(neighbours)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceLocation = f"{where:.6f}"
        ds.InstanceNumber = k + 1
        ds.SliceThickness = ds.SpacingBetweenSlices = f"{step:.6f}"
        datasets.append(ds)
    return _write(deidentified(datasets, task) if deidentify else datasets, Path(out_dir), overwrite)


# Free-text and history attributes PS3.15's basic profile removes (action X) that dicognito leaves as they are.
_DEIDENTIFY_REMOVE = ("StudyDescription", "ImageComments", "AdditionalPatientHistory", "PatientComments",
                      "RequestAttributesSequence", "PerformedProcedureStepDescription", "AdmittingDiagnosesDescription",
                      "PatientAge", "PatientSize", "PatientWeight", "Occupation", "ProtocolName",
                      "ReferencedStudySequence", "ReferencedPatientSequence",
                      "ReferencedPerformedProcedureStepSequence")


def deidentified(datasets: list[FileDataset], task: str) -> list[FileDataset]:
    """The series under PS3.15's Basic Application Level Confidentiality Profile, for research export.

    dicognito (a maintained implementation of the profile) replaces names, IDs, addresses and equipment, every
    UID (consistently across the series, so the series stays one series and its references stay internal) and
    shifts dates; the free-text attributes it keeps are removed here; birth date and sex are emptied (Type 2);
    ``PatientIdentityRemoved`` YES with the profile's code (113100) says what was done.
    """
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()  # one per series: the same source UID maps to the same new UID in every file
    for ds in datasets:
        anonymizer.anonymize(ds)
        for key in _DEIDENTIFY_REMOVE:
            if key in ds:
                delattr(ds, key)
        ds.PatientBirthDate = ds.PatientSex = ""
        ds.SeriesDescription = f"meddiff {task}"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethodCodeSequence = [_code(codes.DCM.BasicApplicationConfidentialityProfile)]
    return datasets


def _write(datasets: list[FileDataset], path: Path, overwrite: bool) -> Path:
    """One object to a ``.dcm`` path as a file; otherwise a folder of ``slice_XXXX.dcm`` (``meddiff.outputs``: under
    the output's lock, staged under a unique name, only meddiff's own earlier series replaced, checked after)."""
    from meddiff.outputs import commit_series, locked_atomic_path, staged_series

    if path.suffix.lower() == ".dcm":
        if len(datasets) > 1:
            raise MeddiffError(f"{path}: a series of {len(datasets)} slices is written as a folder of files — give "
                               "-o a folder name without .dcm")
        with locked_atomic_path(path, overwrite) as tmp:
            datasets[0].save_as(tmp, enforce_file_format=True)
        return path
    with staged_series(path, overwrite) as stage:
        for k, dataset in enumerate(datasets):
            dataset.save_as(stage / f"slice_{k:04d}.dcm", enforce_file_format=True)
        return commit_series(stage, path, str(datasets[0].SeriesInstanceUID), overwrite)


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
            spacing = " x ".join(f"{float(v):.4g}" for v in header.get("PixelSpacing") or []) or "unknown"
            where = ", ".join(f"{v:.4g}" for v in LPS_TO_RAS @ np.asarray(position))
            raise MeddiffError(f"the result ({image.grid}) is not on the grid of {source} (a {header.Rows} x "
                               f"{header.Columns} slice of {spacing} mm at ({where}) mm RAS): DICOM output derives "
                               "from the source series the image was read from, or from a --template on its grid")
        plane = array[:, :, index].T
        if plane.shape != (int(header.Rows), int(header.Columns)):
            raise MeddiffError(f"the result's slices are {plane.shape}, the source's {header.Rows} x {header.Columns}")
        planes.append(plane)
    return np.stack(planes)


def _derived_object(header: Dataset, planes: np.ndarray, series_uid: str, number: int, description: str, task: str,
                    now: datetime.datetime, scale_for, low: float) -> FileDataset:
    """A copy of the source object's header with the derived pixels, new UIDs and the derivation recorded: at the
    top level for a single-frame object, in each frame's Derivation Image functional group for a multi-frame one
    (where the enhanced IODs keep it). ``scale_for(slope, intercept, can_rescale)``: the stored rescale for the
    source's; ``low``: the result's least value (one pixel representation for the whole series)."""
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
        # the functional groups keep the rescale: every item of it is set to the one chosen
        transforms = [item for holder in (*ds.PerFrameFunctionalGroupsSequence, shared)
                      for item in holder.get("PixelValueTransformationSequence", [])]
        scale, written, can_rescale = (transforms or [header])[0], False, bool(transforms)
    else:
        ds.ImageType = ["DERIVED", "SECONDARY", *list(header.get("ImageType", []))[2:]]
        ds.update(_derivation(header, description, task))  # description, code and source image, at the top level
        scale, transforms, can_rescale = header, [], True
        written = "RescaleSlope" in header or header.SOPClassUID != MRImageStorage
    source_scale = float(scale.get("RescaleSlope", 1)), float(scale.get("RescaleIntercept", 0))
    slope, intercept = scale_for(*source_scale, can_rescale)
    for item in transforms:
        item.RescaleSlope, item.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
    _set_pixels(ds, planes if len(planes) > 1 else planes[0], slope, intercept,
                written or (not transforms and (slope, intercept) != source_scale), low=low)
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
                     low: float, scale: tuple[float, float]) -> FileDataset:
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
    slope, intercept = scale
    _set_pixels(ds, plane.T, slope, intercept, rescaled or (slope, intercept) != (1.0, 0.0), low=low)
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


def storage_scale(values: np.ndarray, slope: float, intercept: float, can_rescale: bool,
                  where: str) -> tuple[float, float]:
    """The rescale (slope, intercept) that represents ``values`` in 16 stored bits.

    The given one (the source's, so every value it can represent comes back exactly) when the values fit it and it
    resolves them; a coarser multiple of it when they span more than 16 bits at that scale (said in a warning); a
    finer one when they span fewer than 255 steps and fall between them (a 0-1 probability map at slope 1). Without
    ``can_rescale`` (storage that keeps no rescale) either case is refused: no value is ever clipped or flattened.
    """
    low, high = float(values.min()), float(values.max())
    lo, hi = (low - intercept) / slope, (high - intercept) / slope
    fits = (round(lo) >= -32768 and round(hi) <= 32767) or (round(lo) >= 0 and round(hi) <= 65535)
    if hi - lo < 255:  # a narrow range: does the rescale resolve the values (in float64: a copy only here)
        steps = (values.astype(np.float64) - intercept) / slope
        coarse = not np.allclose(steps, np.round(steps), atol=1e-3)
    else:
        coarse = False
    if fits and not coarse:
        return slope, intercept
    if not can_rescale:
        problem = "do not fit its 16 bits" if not fits else "fall between its whole stored steps"
        raise MeddiffError(f"values {low:.6g}..{high:.6g} {problem} at the rescale of {where} (slope {slope:g}, "
                           f"intercept {intercept:g}), which keeps no other — write NIfTI instead")
    if not fits:
        k = math.ceil((hi - math.floor(lo)) / 65535)
        new = slope * k, intercept + math.floor(lo) * slope
        log.warning("values %.6g..%.6g do not fit 16 bits at the rescale of %s: stored at slope %g (not %g), "
                    "a precision of %g", low, high, where, new[0], slope, new[0])
        return new
    return ((high - low) / 65535.0 or slope), low


def _set_pixels(ds: Dataset, rows_cols: np.ndarray, slope: float, intercept: float, rescaled: bool,
                low: float | None = None) -> None:
    """Stored values ``round((value - intercept) / slope)`` in 16 bits, unsigned unless some are negative, at a
    scale ``storage_scale`` chose (so none is clipped); the rescale attributes written when ``rescaled``."""
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
