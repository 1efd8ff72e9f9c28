"""``meddiff inpaint`` (RePaint, or a mask-conditioned model's own pass: the model decides) against biharmonic
inpainting on a held-out real MRI slice, and a real volume.

The slice is dipy's T1 coronal slice (256x256, 1 mm), which no meddiff model trains on; each mask is cut
out and filled, and the fill is compared with the truth inside the mask (PSNR over the brain's intensity
peak, and the mean absolute error). The baseline is scikit-image's biharmonic inpainting, the classical
smooth fill. A smooth fill scores well on PSNR, which rewards the mean; RePaint draws texture, which PSNR
penalises: the panel shows both. The volume is pydicom-data's ``emri_small`` head MR (64x64x10), filled
slice by slice across three slices, to show a 2D model on a real volume (timed). Writes a JSON record and
a PNG panel (truth, masked, biharmonic, meddiff per mask).

    python -m bench.inpaint_quality --model OUT/model [--name inpaint_quality_conditioned]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage.restoration import inpaint_biharmonic

from bench import harness
from meddiff import Image
from meddiff.data.samples import dipy_t1_slice, pydicom_data_image
from meddiff.pipelines import load_pipeline
from meddiff.viz import save_grid

MASKS = {"brain edge": (slice(70, 110), slice(40, 80)), "deep, central": (slice(110, 150), slice(100, 150))}


def scores(truth: np.ndarray, fill: np.ndarray, mask: np.ndarray, peak: float) -> dict:
    error = fill[mask] - truth[mask]
    return {"psnr_db": float(10 * np.log10(peak**2 / np.mean(error**2))), "mae": float(np.mean(np.abs(error)))}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results",
                            out_help="the folder of the JSON record and the panel (default: %(default)s)")
    parser.add_argument("--model", required=True, help="model folder (an unconditional MRI model)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--resample", type=int, default=5)
    parser.add_argument("--jump", type=int, default=10)
    parser.add_argument("--name", default="inpaint_quality", help="stem of the JSON record (the panel: NAME_panel.png)")
    return parser


def run(args: argparse.Namespace) -> None:
    pipeline = load_pipeline(args.model)
    image = dipy_t1_slice()
    truth = image.array
    peak = float(truth.max())
    sampling = {"steps": args.steps, "resample": args.resample, "jump": args.jump}
    method = "mask-conditioned" if pipeline.config.task == "inpaint" else "RePaint"
    record, panels = {"model": args.model, "method": method, **sampling, "slice": {}}, []
    for name, (rows, cols) in MASKS.items():
        mask = np.zeros(truth.shape, bool)
        mask[rows, cols] = True
        masked = np.where(mask, 0.0, truth)
        smooth = inpaint_biharmonic(masked / peak, mask) * peak
        with harness.stopwatch() as lap:
            filled = pipeline.inpaint(image, mask, **sampling, seed=0, progress=False)[0]
        seconds = lap.seconds
        assert np.array_equal(filled.array[~mask], truth[~mask])
        record["slice"][name] = {"biharmonic": scores(truth, smooth, mask, peak),
                                 "meddiff": scores(truth, filled.array, mask, peak), "meddiff_seconds": seconds}
        print(name, json.dumps(record["slice"][name]), flush=True)
        panels += [truth, masked, smooth, filled.array]
    volume = pydicom_data_image("emri_small.dcm")()
    mask = np.zeros(volume.array.shape, bool)
    mask[20:40, 24:44, 3:6] = True
    with harness.stopwatch() as lap:
        filled = pipeline.inpaint(Image(volume.array, volume.affine, "MR"), mask, **sampling, progress=False)[0]
    record["volume"] = {"shape": list(volume.array.shape), "slices_filled": 3, "seconds": lap.seconds,
                        "outside_mask_identical": bool(np.array_equal(filled.array[~mask], volume.array[~mask]))}
    print("volume", json.dumps(record["volume"]), flush=True)
    out = Path(args.out)
    harness.write_result("inpaint_quality", args, record, out / f"{args.name}.json")
    save_grid(panels, out / f"{args.name}_panel.png", columns=4, window=(0.0, peak))


if __name__ == "__main__":
    harness.main(run, options)
