"""meddiff denoising against BM3D, dipy non-local means and scikit-image non-local means.

Held-out real MR images (never used in training): dipy's ``t1_coronal_slice`` (256x256 brain T1),
pydicom-data's ``MR2_UNCR`` shoulder MR (1024x1024 averaged down to 256x256) and the middle frame of
``emri_small`` (64x64 head MR). Rician noise at 1, 3, 5, 7 and 9 % of each image's maximum; the
baselines get the TRUE sigma, meddiff estimates its own. PSNR and SSIM on the foreground (pixels
above 10 % of the clean maximum, holes filled), time per image. Writes ``denoise.json``, a markdown
table (``denoise.md``) and a panel (``denoise_panel.png``: noisy / BM3D / meddiff / clean).

``--floor``: the Rician noise floor instead. On the T1 and shoulder slices, meddiff without and with
its Rician bias correction (``rician_correction``): PSNR over the whole image and the foreground,
and mean bias and RMSE (in units of the noise sigma) in the background (outside the foreground
dilated by 3 pixels) and in dark tissue (the darkest 10 % of the foreground). Writes
``denoise_floor.json`` (also three ``sqrt(max(D^2 - k sigma^2, 0))`` corrections of the same output),
``denoise_floor.md`` and ``denoise_floor_panel.png``.

``--adapt STEPS`` adds a column: meddiff after ``pipeline.adapt`` (``meddiff denoise --adapt``), denoising at the
sigma it adapted at where the adaptation was kept; the table then names the column and the records keep each
adaptation's line.

    python -m bench.denoise --out bench/results [--model mri-denoise] [--levels 1 3 5 7 9] [--threads 2] [--adapt 40]
    python -m bench.denoise --out bench/results --floor --levels 3 5 9 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from bench import harness
from meddiff import Image
from meddiff.data.samples import dipy_t1_slice, pydicom_data_image
from meddiff.data.synthetic import rician_noise
from meddiff.diffusion.noise_level import estimate_noise_sigma
from meddiff.metrics import foreground_mask, psnr, ssim
from meddiff.pipelines import DenoiseSpec, load_pipeline
from meddiff.pipelines.denoise import spec_after
from meddiff.viz import save_grid


def held_out() -> dict[str, np.ndarray]:
    shoulder = pydicom_data_image("MR2_UNCR.dcm")().array.squeeze()
    head = pydicom_data_image("emri_small.dcm")().array
    return {
        "t1_coronal_slice (dipy, brain)": dipy_t1_slice().array.squeeze(),
        "MR2_UNCR (shoulder, 4x4 mean)": shoulder.reshape(256, 4, 256, 4).mean(axis=(1, 3)),
        "emri_small (head, frame 5)": head[:, :, head.shape[2] // 2],
    }


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    return bm3d.bm3d(noisy, sigma_psd=sigma)


def dipy_nlmeans(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from dipy.denoise.nlmeans import nlmeans

    # 'classic': dipy's default 'blockwise' method barely denoises a single slice (measured +0.2 dB at 3 %)
    return nlmeans(noisy[..., None], sigma=sigma, rician=True, method="classic")[..., 0]


def skimage_nlmeans(noisy: np.ndarray, sigma: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    # scikit-image's recommendation for fast mode: h = 0.8 sigma, sigma given
    return denoise_nl_means(noisy, h=0.8 * sigma, sigma=sigma, fast_mode=True, patch_size=5, patch_distance=6)


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results", out_help="the folder of the JSON record, table and panel "
                            "(default: %(default)s)")
    parser.add_argument("--model", default="mri-denoise")
    parser.add_argument("--levels", type=float, nargs="+", default=[1, 3, 5, 7, 9])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--floor", action="store_true", help="the Rician noise floor benchmark (see above) instead")
    parser.add_argument("--adapt", type=int, metavar="STEPS", help="add meddiff after per-scan adaptation")
    parser.add_argument("--name", default="denoise", help="the records' file names (default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    if args.floor:
        return floor_benchmark(pipeline, args.levels, Path(args.out), args.model, args)
    methods = {
        "BM3D": bm3d_denoise,
        "dipy nlmeans": dipy_nlmeans,
        "skimage nlmeans": skimage_nlmeans,
        "meddiff": lambda y, s: pipeline.denoise(Image(y, np.eye(4), "MR")).array,
    }
    adaptations = []
    if args.adapt:
        def adapted(y: np.ndarray, _sigma: float) -> np.ndarray:
            image = Image(y, np.eye(4), "MR")
            tuned, adaptation = pipeline.adapt(image, steps=args.adapt)
            adaptations.append(adaptation.describe())
            return tuned.denoise(image, spec_after(adaptation, DenoiseSpec())).array

        methods["meddiff --adapt"] = adapted
    rows, panel = [], []
    for name, clean in held_out().items():
        clean = clean.astype(np.float32)
        mask, peak = foreground_mask(clean), float(clean.max())
        for level in args.levels:
            sigma = level / 100 * peak
            noisy = rician_noise(clean, sigma, np.random.default_rng(int(level)))
            results = {"noisy": (noisy, 0.0)}
            for method, denoise in methods.items():
                with harness.stopwatch() as lap:
                    estimate = np.asarray(denoise(noisy, sigma), dtype=np.float32)
                results[method] = (estimate, lap.seconds)
            for method, (estimate, seconds) in results.items():
                rows.append({"image": name, "noise_percent": level, "method": method,
                             "psnr": psnr(clean, estimate, peak, mask), "ssim": ssim(clean, estimate, peak, mask),
                             "seconds": seconds, "pixels": int(clean.size)})
                print(f"{name:32s} {level:3.0f}% {method:16s} PSNR {rows[-1]['psnr']:6.2f}  SSIM "
                      f"{rows[-1]['ssim']:.4f}  {seconds:6.2f} s", flush=True)
            if name.startswith("t1_coronal") and level == 7:
                panel = [noisy, results["BM3D"][0], results["meddiff"][0], clean]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result(args.name, args, {"model": args.model, "rows": rows, "adaptations": adaptations},
                         out / f"{args.name}.json")
    (out / f"{args.name}.md").write_text(table(rows))
    if panel and args.name == "denoise":
        save_grid(panel, out / "denoise_panel.png", columns=4, window=(0.0, float(panel[-1].max())))
    print(table(rows))


def table(rows: list[dict]) -> str:
    """PSNR / SSIM per image and noise level, one column per method, plus meddiff minus the best baseline."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ours = [m for m in methods if m.startswith("meddiff")]
    lines = ["| image | noise | " + " | ".join(methods) + " | "
             + " | ".join(f"{m} - best baseline (dB)" for m in ours) + " |",
             "|" + "---|" * (len(methods) + 2 + len(ours))]
    for image in dict.fromkeys(r["image"] for r in rows):
        for level in dict.fromkeys(r["noise_percent"] for r in rows):
            cell = {r["method"]: r for r in rows if r["image"] == image and r["noise_percent"] == level}
            best = max(cell[m]["psnr"] for m in ("BM3D", "dipy nlmeans", "skimage nlmeans"))
            values = " | ".join(f"{cell[m]['psnr']:.2f} / {cell[m]['ssim']:.3f}" for m in methods)
            gaps = " | ".join(f"{cell[m]['psnr'] - best:+.2f}" for m in ours)
            lines.append(f"| {image} | {level:.0f} % | {values} | {gaps} |")
    return "\n".join(lines) + "\n"


def floor_regions(clean: np.ndarray) -> dict[str, np.ndarray]:
    """Foreground, background (away from the anatomy's blurred edge) and dark tissue masks of a clean slice."""
    foreground = foreground_mask(clean)
    return {"foreground": foreground, "background": ~ndimage.binary_dilation(foreground, iterations=3),
            "dark tissue": foreground & (clean <= np.percentile(clean[foreground], 10))}


def floor_benchmark(pipeline, levels: list[float], out: Path, model: str, args: argparse.Namespace) -> None:
    """meddiff without / with the Rician bias correction: PSNR, and bias / RMSE where the floor shows."""
    images = {k: v for k, v in held_out().items() if not k.startswith("emri")}
    rows, panel = [], []
    for name, clean in images.items():
        clean = clean.astype(np.float32)
        regions, peak = floor_regions(clean), float(clean.max())
        for level in levels:
            sigma = level / 100 * peak
            noisy = rician_noise(clean, sigma, np.random.default_rng(int(level)))
            image = Image(noisy, np.eye(4), "MR")
            results = {"noisy": noisy}
            for method, correct in (("meddiff, floor kept", False), ("meddiff, floor removed", True)):
                with harness.stopwatch() as lap:
                    results[method] = pipeline.denoise(image, rician_correction=correct).array
                print(f"{name:32s} {level:3.0f}% {method:24s} {lap.seconds:6.2f} s", flush=True)
            # the alternatives the shipped inverse of the Rician mean was chosen against, on the same network output
            kept, estimated = results["meddiff, floor kept"], estimate_noise_sigma(noisy)
            for k, label in ((1.0, "1"), (np.pi / 2, "pi/2"), (2.0, "2")):
                results[f"sqrt(D^2 - {label} sigma^2)"] = np.sqrt(
                    np.maximum(kept.astype(np.float64) ** 2 - k * estimated**2, 0.0))
            for method, estimate in results.items():
                row = {"image": name, "noise_percent": level, "sigma": sigma, "method": method,
                       "psnr": psnr(clean, estimate, peak),
                       "psnr_foreground": psnr(clean, estimate, peak, regions["foreground"]),
                       "reference_background_mean": float(clean[regions["background"]].mean()) / sigma}
                for region in ("background", "dark tissue"):
                    error = (estimate - clean)[regions[region]].astype(np.float64)
                    row[f"{region} bias"] = error.mean() / sigma
                    row[f"{region} rmse"] = np.sqrt(np.mean(error**2)) / sigma
                rows.append(row)
            if name.startswith("t1_coronal") and level == max(levels):
                panel = [results["noisy"], results["meddiff, floor kept"], results["meddiff, floor removed"], clean]
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result("denoise_floor", args, {"model": model, "rows": rows}, out / "denoise_floor.json")
    (out / "denoise_floor.md").write_text(floor_table([r for r in rows if not r["method"].startswith("sqrt")]))
    if panel:
        # top row: the full window; bottom row: 0-15 % of the maximum, where the floor shows as grey
        peak = float(panel[-1].max())
        dark = [np.clip(a / (0.15 * peak), 0.0, 1.0) * peak for a in panel]
        save_grid(panel + dark, out / "denoise_floor_panel.png", columns=4, window=(0.0, peak))
    print(floor_table(rows))


def floor_table(rows: list[dict]) -> str:
    lines = ["| image | noise | method | PSNR all (dB) | PSNR foreground (dB) | background bias / RMSE (sigma) | "
             "dark tissue bias / RMSE (sigma) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['image'].split(' (')[0]} | {r['noise_percent']:.0f} % | {r['method']} | {r['psnr']:.2f} | "
                     f"{r['psnr_foreground']:.2f} | {r['background bias']:+.2f} / {r['background rmse']:.2f} | "
                     f"{r['dark tissue bias']:+.2f} / {r['dark tissue rmse']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    harness.main(run, options)
