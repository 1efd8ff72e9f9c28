"""Does the default Rician floor correction of ``meddiff denoise`` ever make a scan worse?

Real MR slices that no bundled model saw: pydicom's ``MR_small`` (64x64), three frames of pydicom-data's
``emri_small`` (64x64 head MR), pydicom-data's ``MR2_UNCR`` shoulder (4x4 mean to 256x256) and
``MR-SIEMENS-DICOM-WithOverlays`` abdomen (2x2 mean to 242x242), plus dipy's ``t1_coronal_slice`` (the
validation image that chose the model's strength). Evaluation only: none of them trains or tunes anything.
Rician noise at 3, 5 and 9 % of each image's maximum, a few noise seeds each; foreground PSNR (pixels above
10 % of the clean maximum, holes filled) of the noisy input, the default (``meddiff denoise``) and
``--no-rician-correction``. Writes ``rician_safety.json`` and a table of medians over the seeds
(``rician_safety.md``).

    OMP_NUM_THREADS=1 python -m bench.rician_safety --out bench/results [--levels 3 5 9] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from bench import harness
from meddiff import Image
from meddiff.data.synthetic import rician_noise
from meddiff.metrics import foreground_mask, psnr
from meddiff.pipelines import load_pipeline

EMRI_FRAMES = (0, 5, 9)


def _dicom(name: str) -> np.ndarray:
    from pydicom.data import get_testdata_file

    from meddiff.io import load_image

    return load_image(get_testdata_file(name)).array.astype(np.float32)


def images() -> dict[str, Callable[[], np.ndarray]]:
    """Name -> loader of a clean 2D slice (float32, image units)."""
    from meddiff.data.samples import dipy_t1_slice

    def emri(frame: int) -> Callable[[], np.ndarray]:
        return lambda: _dicom("emri_small.dcm")[:, :, frame]

    return {
        "MR_small (pydicom, 64x64)": lambda: _dicom("MR_small.dcm").squeeze(),
        **{f"emri_small frame {k} (64x64)": emri(k) for k in EMRI_FRAMES},
        "MR2_UNCR (shoulder, 4x4 mean, 256x256)":
            lambda: _dicom("MR2_UNCR.dcm").squeeze().reshape(256, 4, 256, 4).mean(axis=(1, 3)),
        "MR-SIEMENS (abdomen, 2x2 mean, 242x242)":
            lambda: _dicom("MR-SIEMENS-DICOM-WithOverlays.dcm").squeeze().reshape(242, 2, 242, 2).mean(axis=(1, 3)),
        "t1_coronal_slice (dipy, validation, 256x256)": lambda: dipy_t1_slice().array.squeeze(),
    }


def noisy_copy(clean: np.ndarray, level: float, seed: int) -> np.ndarray:
    """``clean`` with Rician noise of ``level`` % of its maximum; the draw depends on the seed and the level."""
    return rician_noise(clean, level / 100 * float(clean.max()), np.random.default_rng(1000 * seed + int(level)))


def compare(pipeline, clean: np.ndarray, level: float, seed: int) -> dict:
    """Foreground PSNR of the noisy input, the default and ``rician_correction=False`` on one noisy copy."""
    clean = clean.astype(np.float32)
    noisy = noisy_copy(clean, level, seed)
    image, peak, mask = Image(noisy, np.eye(4), "MR"), float(clean.max()), foreground_mask(clean)
    default = pipeline.denoise(image, progress=False).array
    kept = pipeline.denoise(image, rician_correction=False, progress=False).array
    return {"noisy": psnr(clean, noisy, peak, mask), "default": psnr(clean, default, peak, mask),
            "no_correction": psnr(clean, kept, peak, mask), "corrected": not np.array_equal(default, kept)}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results", out_help="the folder of rician_safety.json and "
                            "rician_safety.md (default: %(default)s)")
    parser.add_argument("--model", default="mri-denoise")
    parser.add_argument("--levels", type=float, nargs="+", default=[3, 5, 9])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    rows = []
    with harness.stopwatch() as lap:
        for name, load in images().items():
            clean = load()
            for level in args.levels:
                for seed in args.seeds:
                    rows.append({"image": name, "noise_percent": level, "seed": seed,
                                 **compare(pipeline, clean, level, seed)})
                    r = rows[-1]
                    print(f"{name:46s} {level:2.0f}% seed {seed}: noisy {r['noisy']:6.2f}  default {r['default']:6.2f}"
                          f"  no correction {r['no_correction']:6.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result("rician_safety", args, {"model": args.model, "seconds": lap.seconds, "rows": rows},
                         out / "rician_safety.json")
    (out / "rician_safety.md").write_text(table(rows))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Medians over the seeds per image and level, and the worst seed of default minus no correction."""
    lines = ["| image | noise | noisy | default | no correction | default - no correction: median / worst (dB) "
             "| corrected |", "|---|---|---:|---:|---:|---:|---:|"]
    for image in dict.fromkeys(r["image"] for r in rows):
        for level in dict.fromkeys(r["noise_percent"] for r in rows):
            cell = [r for r in rows if r["image"] == image and r["noise_percent"] == level]
            median = {k: float(np.median([r[k] for r in cell])) for k in ("noisy", "default", "no_correction")}
            gain = [r["default"] - r["no_correction"] for r in cell]
            lines.append(f"| {image} | {level:.0f} % | {median['noisy']:.2f} | {median['default']:.2f} | "
                         f"{median['no_correction']:.2f} | {np.median(gain):+.2f} / {min(gain):+.2f} | "
                         f"{sum(r['corrected'] for r in cell)} of {len(cell)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    harness.main(run, options)
