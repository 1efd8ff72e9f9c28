"""Axial MNI152 T1 slices (2 mm in-plane, every 1 mm, 96x112, in [-1, 1]) for the sampler benchmark.

Prepared with meddiff's own transforms; writes ``slices.npy`` (float16, N x 1 x 96 x 112) and
``intensity.json`` (the MR window that [-1, 1] maps back to).

    python -m bench.mni_slices --out .gpu
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from monai.transforms import Compose, ResizeWithPadOrCropd, Spacingd

from bench import harness
from meddiff.data.samples import nilearn_file
from meddiff.data.transforms import LoadImaged, NormalizeIntensityd, SliceVolumed

SHAPE = (96, 112)


def options() -> argparse.ArgumentParser:
    return harness.parser(__doc__, out=".gpu", out_help="the folder the slices go to (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    norm = NormalizeIntensityd("image")
    prep = Compose([LoadImaged("image"), norm, Spacingd("image", pixdim=(2.0, 2.0, 1.0))])
    data = prep({"image": str(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")), "modality": "MR"})
    low, high = data["image"].applied_operations[0]["extra_info"].values()
    slices = SliceVolumed("image", axis="axial", min_foreground=0.1)(data)
    crop = ResizeWithPadOrCropd("image", spatial_size=SHAPE, constant_values=-1.0)
    array = np.stack([np.asarray(crop(s)["image"]) for s in slices]).astype(np.float16)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "slices.npy", array)
    (out / "intensity.json").write_text(json.dumps({"low": low, "high": high}))
    print(f"{array.shape} slices, range {array.min():.2f}..{array.max():.2f}, MR window {low:.1f}..{high:.1f}")


if __name__ == "__main__":
    harness.main(run, options)
