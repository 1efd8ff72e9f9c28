"""NIfTI (.nii, .nii.gz) through nibabel; the affine is nibabel's, already RAS+ mm.

Before any voxel is read the header is checked: its voxel type (complex and RGB voxels are refused,
not silently cut to their real part), its sizes (each at least 1, no more bytes than the file can
hold, no more voxels than memory), so that a corrupt header ends in one sentence, not an empty
MemoryError or a multi-gigabyte allocation.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.imageglobals import LoggingOutputSuppressor

from meddiff.errors import MeddiffError
from meddiff.files import full_suffix
from meddiff.image import Image
from meddiff.io.guard import check_shape, reason

# NIfTI has no modality field; meddiff keeps it in the 80-byte description so it survives a round trip.
_MODALITY_TAG = "meddiff:modality="


def _unreadable(path: Path, exc: BaseException) -> MeddiffError:
    return MeddiffError(f"cannot read NIfTI {path}: {reason(exc)} — the file is truncated or not NIfTI: "
                        "copy or export it again")


def read_nifti(path: Path) -> Image:
    # nibabel logs header repairs ("sizeof_hdr should be 348; set ...") to stderr through its own handler
    with LoggingOutputSuppressor():
        try:
            img = nib.load(str(path))
            dtype = img.get_data_dtype()
            shape = img.shape
            offset = int(img.dataobj.offset)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for corrupt/truncated headers
            raise _unreadable(path, exc) from None
        _check_voxel_type(path, dtype)
        while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1) volumes are common
            shape = shape[:-1]
        if len(shape) not in (2, 3, 4):
            raise MeddiffError(f"{path}: the header gives {len(shape)} axes, {tuple(shape)}; meddiff reads 2D, "
                               "3D and 4D images — the header is corrupt or the image needs reshaping first")
        compressed = full_suffix(path) == ".nii.gz"
        check_shape(path, shape, dtype.itemsize, available=max(path.stat().st_size - (0 if compressed else offset), 0),
                    compressed=compressed)
        try:
            array = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape)
        except Exception as exc:  # noqa: BLE001 - truncated data, bad gzip stream, ...
            raise _unreadable(path, exc) from None
    descrip = img.header.get("descrip", np.array(b"")).item()
    descrip = descrip.decode("ascii", "ignore") if isinstance(descrip, bytes) else str(descrip)
    modality = descrip.split(_MODALITY_TAG, 1)[1].split()[0] if _MODALITY_TAG in descrip else None
    return Image(array=array, affine=img.affine, modality=modality)


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    """Real numbers only. Complex voxels (raw MR reconstructions, k-space) are refused rather than cut to
    their real part or silently turned into a magnitude: which one is right depends on what the user
    does next, and the phase would be gone either way. RGB(A) voxels (colour FA maps, screenshots) are
    refused too: a grey version of a colour-coded map means nothing."""
    if dtype.kind == "c":
        raise MeddiffError(
            f"{path} holds complex values ({dtype}): meddiff reads real-valued (magnitude) images — "
            "save the magnitude first (e.g. numpy.abs of the data, or fslcomplex -realabs)"
        )
    if dtype.fields is not None:
        raise MeddiffError(f"{path} holds colour voxels ({', '.join(dtype.names)}): "
                           "meddiff reads single-valued images — save one channel or a grey image first")
    if dtype.kind not in "biuf":
        raise MeddiffError(f"{path} holds voxels of type {dtype}, which meddiff cannot read "
                           "— save it as float32 or an integer type")


def write_nifti(image: Image, path: Path) -> None:
    img = nib.Nifti1Image(image.array.astype(np.float32), image.affine)
    img.set_sform(image.affine, code="scanner")
    img.set_qform(image.affine, code="scanner")
    img.header.set_xyzt_units("mm", "sec")
    if image.modality:
        img.header["descrip"] = f"{_MODALITY_TAG}{image.modality}".encode("ascii")
    nib.save(img, str(path))
