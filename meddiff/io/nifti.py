"""NIfTI (.nii, .nii.gz) through nibabel; the affine is nibabel's, already RAS+ mm."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from meddiff.errors import MeddiffError
from meddiff.image import Image

# NIfTI has no modality field; meddiff keeps it in the 80-byte description so it survives a round trip.
_MODALITY_TAG = "meddiff:modality="


def read_nifti(path: Path) -> Image:
    try:
        img = nib.load(str(path))
        array = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises many types for corrupt/truncated files
        raise MeddiffError(f"cannot read NIfTI {path}: {exc}") from None
    descrip = img.header.get("descrip", np.array(b"")).item()
    descrip = descrip.decode("ascii", "ignore") if isinstance(descrip, bytes) else str(descrip)
    modality = descrip.split(_MODALITY_TAG, 1)[1].split()[0] if _MODALITY_TAG in descrip else None
    while array.ndim > 3 and array.shape[-1] == 1:  # (x, y, z, 1) volumes are common
        array = array[..., 0]
    return Image(array=array, affine=img.affine, modality=modality)


def write_nifti(image: Image, path: Path) -> None:
    img = nib.Nifti1Image(image.array.astype(np.float32), image.affine)
    img.set_sform(image.affine, code="scanner")
    img.set_qform(image.affine, code="scanner")
    img.header.set_xyzt_units("mm", "sec")
    if image.modality:
        img.header["descrip"] = f"{_MODALITY_TAG}{image.modality}".encode("ascii")
    nib.save(img, str(path))
