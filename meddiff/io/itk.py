"""SimpleITK images <-> ``Image``, and the formats SimpleITK reads best (MHA/NRRD, PNG/JPEG).

SimpleITK reports geometry in LPS (DICOM/ITK convention) with arrays ordered (k, j, i); ``Image`` uses
RAS+ and (i, j, k) as nibabel does. The conversion below is the one MONAI's ITKReader applies.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meddiff.errors import MeddiffError
from meddiff.files import full_suffix
from meddiff.image import Image
from meddiff.io.guard import check_shape, native_stderr_captured, reason, tidy

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Luma weights (ITU-R BT.601) for colour PNG/JPEG radiographs saved as RGB.
_LUMA = np.array([0.299, 0.587, 0.114])


def sitk_to_array_affine(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array in (i, j, k) order and the 4x4 voxel -> RAS+ mm affine of a SimpleITK image."""
    array = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() > 1:  # RGB(A) pixels: last axis holds the components
        array = array[..., :3] @ _LUMA[: array.shape[-1]] if array.shape[-1] >= 3 else array[..., 0]
    array = array.transpose(tuple(reversed(range(array.ndim))))
    dim = img.GetDimension()
    spatial = min(dim, 3)
    direction = np.array(img.GetDirection()).reshape(dim, dim)[:spatial, :spatial]
    lps = np.eye(3)
    lps[:spatial, :spatial] = direction * np.array(img.GetSpacing()[:spatial])
    origin = np.zeros(3)
    origin[:spatial] = img.GetOrigin()[:spatial]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ lps
    affine[:3, 3] = LPS_TO_RAS @ origin
    return array, affine


def image_to_sitk(image: Image) -> sitk.Image:
    """A SimpleITK image with the same voxels and geometry (LPS, (k, j, i) order)."""
    array = image.array
    lps = LPS_TO_RAS @ image.affine[:3, :3]
    origin = LPS_TO_RAS @ image.affine[:3, 3]
    spatial = image.spatial_ndim
    in_plane_only = np.allclose(lps[2, :2], 0) and np.allclose(lps[:2, 2], 0) and np.isclose(origin[2], 0)
    if spatial == 2 and not in_plane_only:  # an oblique or positioned slice needs the third axis
        array, spatial = array[..., None], 3
    block = lps[:spatial, :spatial]
    spacing = np.linalg.norm(block, axis=0)
    if np.any(spacing == 0):
        raise MeddiffError("affine has a zero-length voxel axis — cannot write this geometry")
    direction = block / spacing
    if not np.allclose(direction.T @ direction, np.eye(spatial), atol=1e-4):
        raise MeddiffError("affine is sheared; MHA/NRRD/DICOM cannot store it — save as NIfTI instead")
    dim = array.ndim
    full_dir = np.eye(dim)
    full_dir[:spatial, :spatial] = direction
    img = sitk.GetImageFromArray(array.transpose(tuple(reversed(range(dim)))), isVector=False)
    img.SetSpacing([float(s) for s in spacing] + [1.0] * (dim - spatial))
    img.SetOrigin([float(o) for o in origin[:spatial]] + [0.0] * (dim - spatial))
    img.SetDirection([float(d) for d in full_dir.ravel()])
    return img


def read_itk(path: Path) -> Image:
    """MHA/MHD/NRRD/PNG/JPEG through SimpleITK; the header's sizes are checked before voxels are read."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    chatter: list[str] = []
    try:
        with native_stderr_captured() as chatter:
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise MeddiffError(f"cannot read {path}: {native_reason(chatter, exc)} — the file is truncated or not a "
                           f"{full_suffix(path)} image: copy or export it again") from None
    check_shape(path, reader.GetSize(), itemsize=4)
    try:
        with native_stderr_captured() as chatter:
            img = reader.Execute()
    except (RuntimeError, MemoryError) as exc:
        raise MeddiffError(f"cannot read {path}: {native_reason(chatter, exc)} — the file is truncated or corrupt: "
                           "copy or export it again") from None
    array, affine = sitk_to_array_affine(img)
    return Image(array=array, affine=affine)


def native_reason(chatter: list[str], exc: BaseException) -> str:
    """Why a SimpleITK read failed: what the C++ reader printed (MetaIO, libpng say it best), else the exception."""
    printed = [ln for ln in chatter if not ln.startswith("WARNING")]
    return "; ".join(tidy(ln) for ln in printed[-3:]) if printed else reason(exc)


def write_itk(image: Image, path: Path, suffix: str) -> None:
    if suffix in (".png", ".jpg", ".jpeg"):
        _write_picture(image, path, suffix)
        return
    sitk.WriteImage(image_to_sitk(image), str(path), useCompression=True)


def picture_plane(array: np.ndarray, path: Path) -> np.ndarray:
    """The 2D plane a PNG/JPEG can hold: the array itself, or a slice volume with its one-voxel axis dropped."""
    plane = array.squeeze() if array.ndim > 2 and sum(n > 1 for n in array.shape) == 2 else array
    if plane.ndim != 2:
        raise MeddiffError(f"{path}: {full_suffix(path)} holds 2D images; "
                           f"this one has shape {array.shape} — use .nii.gz, .mha or .nrrd")
    return plane


def _write_picture(image: Image, path: Path, suffix: str) -> None:
    """PNG keeps integer data exactly (8 or 16 bit); anything else is scaled to the full range."""
    array = picture_plane(image.array, path)
    is_int = np.array_equal(array, np.round(array)) and array.min() >= 0
    if suffix == ".png" and is_int and array.max() <= 65535:
        out = array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    elif is_int and array.max() <= 255:
        out = array.astype(np.uint8)
    else:
        top = 65535 if suffix == ".png" else 255
        lo, hi = float(array.min()), float(array.max())
        log.warning("%s output: intensities %.4g..%.4g rescaled to 0..%d (lossy)", suffix, lo, hi, top)
        scaled = (array - lo) / (hi - lo or 1.0) * top
        out = np.round(scaled).astype(np.uint16 if top > 255 else np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(out.T), str(path))


