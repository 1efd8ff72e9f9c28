"""Training arrays for the bundled ``mri-denoise`` model, for a GPU machine that has no MRI packages.

Slices of the offline training MRI (nilearn MNI152 T1 along all three axes, every second slice; dipy
``S0_10`` and ``aniso_vox`` in their acquired planes, unresampled so their real texture stays), each
volume normalised with meddiff's MR normalisation to [-1, 1], plus a pool of 128x128 dead-leaves
images (uint8). Never the held-out ``t1_coronal_slice`` and never pydicom data. Writes
``denoise_slices.npz`` and ``dead_leaves.npy`` into ``--out``.

    python -m bench.denoise_data --out .gpu
"""

from __future__ import annotations

import argparse
from multiprocessing import Pool
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from dipy.data import get_fnames

from bench import harness
from meddiff.data.samples import nilearn_file
from meddiff.data.synthetic import dead_leaves
from meddiff.data.transforms import NormalizeIntensityd, to_model_range


def normalised(path: Path) -> np.ndarray:
    array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32).squeeze()
    low, high = NormalizeIntensityd("image").intensity_range(torch.from_numpy(array), "MR")
    return to_model_range(array, low, high)


def slices(volume: np.ndarray, axes: tuple[int, ...], every: int) -> list[np.ndarray]:
    kept = []
    for axis in axes:
        for index in range(0, volume.shape[axis], every):
            plane = np.take(volume, index, axis=axis)
            if (plane > -0.8).mean() >= 0.1:  # skip slices that are nearly all background
                kept.append(plane.astype(np.float16))
    return kept


def leaves(seed: int) -> np.ndarray:
    return np.round(dead_leaves((128, 128), np.random.default_rng(seed)) * 255).astype(np.uint8)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=".gpu", out_help="the folder the arrays go to (default: %(default)s)")
    parser.add_argument("--dead-leaves", type=int, default=2000)
    return parser


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    planes = slices(normalised(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")), (0, 1, 2), 2)
    planes += slices(normalised(get_fnames(name="S0_10")), (2,), 1)
    planes += slices(normalised(get_fnames(name="aniso_vox")), (2,), 1)
    np.savez(out / "denoise_slices.npz", *planes)
    with Pool() as pool:
        pool_images = np.stack(pool.map(leaves, range(args.dead_leaves)))
    np.save(out / "dead_leaves.npy", pool_images)
    print(f"{len(planes)} MRI slices, {len(pool_images)} dead-leaves images -> {out}")


if __name__ == "__main__":
    harness.main(run, options)
