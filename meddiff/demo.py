"""``make demo``: the three uses on held-out real images with the bundled models, in a few minutes on a CPU.

1. **Denoise** (``mri-denoise``): dipy's ``t1_coronal_slice`` (held out from every bundled model) with Rician noise
   at 5 % of its maximum; PSNR and SSIM on the foreground.
2. **Inpaint**: a lesion-shaped region (5 % of the body) of a held-out chest CT slice (``ct-inpaint``) and of the
   held-out MRI slice (``mri-inpaint``) is filled; the error inside the region against the real image.
3. **Generate**: CT slices that follow held-out label-map slices of the chest CT (``ct-chest-2d``, its ControlNet)
   and brain MRI slices (``mri-t1-2d``), each folder with its manifest; mean HU per structure against the real
   slices, and FRD (radiomics) against held-out real slices (20 CT, 16 MRI: few, so FRD is a rough number).

Every step runs through the ``meddiff`` command a user would type. Writes one labelled PNG per use
(``denoise_panel.png``, ``inpaint_panel.png``, ``generate_panel.png``), ``summary.json``, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from meddiff.cli.main import main as meddiff
from meddiff.data.masks import RandInpaintMaskd, body_mask, foreground
from meddiff.data.samples import chest_ct_structures, dipy_t1_slice, nilearn_file, write_samples
from meddiff.data.synthetic import rician_noise
from meddiff.files import atomic_path
from meddiff.image import Image
from meddiff.io import load_image, save_image
from meddiff.metrics import foreground_mask, psnr, ssim
from meddiff.metrics.evaluate import frechet_radiomics_distance_of_slices
from meddiff.viz import save_panel

NOISE_PERCENT = 5.0
CT_WINDOW = (-1000.0, 1000.0)
CT_SLICES = tuple(range(20))  # the held-out slab's slices, all generated; inpainting uses slice 8
MRI_SAMPLES = 16
STRUCTURES = {"lungs": "lung_", "liver": "liver", "heart": "heart", "aorta": "aorta", "vertebrae": "vertebrae_",
              "ribs": "rib_"}


def run(*argv: str) -> None:
    """One meddiff command, as a user would type it; a failure stops the demo."""
    if meddiff([str(a) for a in argv]) != 0:
        raise SystemExit(f"demo step failed: meddiff {' '.join(map(str, argv[:2]))}")


def denoise(out: Path) -> dict:
    clean = dipy_t1_slice()
    peak = float(clean.array.max())
    noisy = Image(rician_noise(clean.array, NOISE_PERCENT / 100 * peak, np.random.default_rng(0)), clean.affine, "MR")
    save_image(clean, out / "clean.nii.gz", overwrite=True)
    save_image(noisy, out / "noisy.nii.gz", overwrite=True)
    run("denoise", "-i", out / "noisy.nii.gz", "-o", out / "denoised.nii.gz", "--overwrite")
    denoised = load_image(out / "denoised.nii.gz").array
    mask = foreground_mask(clean.array)
    scores = {f"{name}_{metric}": fn(clean.array, array, peak, mask)
              for name, array in (("noisy", noisy.array), ("denoised", denoised))
              for metric, fn in (("psnr_db", psnr), ("ssim", ssim))}
    window = (0.0, peak)
    save_panel([(noisy.array, f"noisy (Rician {NOISE_PERCENT:g} %)\nPSNR {scores['noisy_psnr_db']:.2f} dB", window),
                (denoised, f"denoised (mri-denoise)\nPSNR {scores['denoised_psnr_db']:.2f} dB", window),
                (clean.array, "clean (held out)", window)],
               out / "denoise_panel.png", "Denoising a held-out brain MRI slice")
    return {"image": "dipy t1_coronal_slice (held out)", "model": "mri-denoise", **scores}


def lesion(image: np.ndarray, body: np.ndarray, seed: int) -> np.ndarray:
    draw = RandInpaintMaskd(shapes=("blob",), area=(0.05, 0.05))
    draw.set_random_state(seed)
    return draw.draw(image, body) & body


def inpaint(out: Path, volume: Image) -> dict:
    k = 8
    ct = Image(volume.array[:, :, k], volume.affine @ _shift(k), "CT")
    mr = dipy_t1_slice()
    results, tiles = {}, []
    for name, image, body, window in (("ct", ct, body_mask(ct.array, -500.0), CT_WINDOW),
                                      ("mr", mr, foreground(mr.array), (0.0, float(mr.array.max())))):
        mask = lesion(image.array, body, seed=0)
        save_image(image, out / f"{name}_slice.nii.gz", overwrite=True)
        save_image(Image(mask.astype(np.uint8), image.affine), out / f"{name}_mask.nii.gz", overwrite=True)
        run("inpaint", "-i", out / f"{name}_slice.nii.gz", "--mask", out / f"{name}_mask.nii.gz", "-o",
            out / f"{name}_filled.nii.gz", "--modality", name.upper(), "--overwrite")
        filled = load_image(out / f"{name}_filled.nii.gz").array
        error = filled[mask] - image.array[mask]
        if name == "ct":
            results["ct_mae_hu"] = float(np.abs(error).mean())
            number = f"MAE in the region {results['ct_mae_hu']:.0f} HU"
        else:
            results["mr_psnr_db"] = float(10 * np.log10(window[1] ** 2 / np.mean(error**2)))
            number = f"PSNR in the region {results['mr_psnr_db']:.1f} dB"
        model = {"ct": "ct-inpaint", "mr": "mri-inpaint"}[name]
        tiles += [(np.where(mask, window[0], image.array), f"{name.upper()}: region removed\n{int(mask.sum())} voxels",
                   window), (filled, f"filled by {model}\n{number}", window), (image.array, "real (held out)", window)]
    save_panel(tiles, out / "inpaint_panel.png", "Inpainting a lesion-shaped region of held-out CT and MRI slices")
    return {"images": "chest CT held-out slab slice, dipy t1_coronal_slice", "models": ["ct-inpaint", "mri-inpaint"],
            **results}


def generate(out: Path, volume: Image, labels: Image) -> dict:
    picked = list(CT_SLICES)
    condition = Image(labels.array[:, :, picked], labels.affine @ _shift(picked[0]))
    save_image(condition, out / "ct_labels.nii.gz", overwrite=True)
    start = time.perf_counter()
    for folder in ("generated_ct", "generated_mri"):  # the demo's own: made anew
        shutil.rmtree(out / folder, ignore_errors=True)
    run("generate", "--model", "ct-chest-2d", "--condition", out / "ct_labels.nii.gz", "-n", 1, "--steps", 30,
        "-o", out / "generated_ct")
    ct_seconds = time.perf_counter() - start
    fake = load_image(out / "generated_ct" / "sample_000000.nii.gz").array
    real = volume.array[:, :, picked]
    names = chest_ct_structures()
    hu = {}
    for group, prefix in STRUCTURES.items():
        region = np.isin(condition.array, [v for v, n in names.items() if n.startswith(prefix)])
        if region.any():
            hu[group] = {"generated": float(fake[region].mean()), "real": float(real[region].mean())}
    start = time.perf_counter()
    run("generate", "--model", "mri-t1-2d", "-n", MRI_SAMPLES, "--steps", 20, "--scheduler", "dpm++2m",
        "-o", out / "generated_mri")
    mri_seconds = time.perf_counter() - start
    mri = [load_image(out / "generated_mri" / f"sample_{i:06d}.nii.gz").array for i in range(MRI_SAMPLES)]
    inside = real > -1500  # the scanner's field of view (outside: -2048 padding in the real CT)
    real_fov, fake_fov = (np.where(inside, array, -1000.0) for array in (real, fake))
    ct_frd = frechet_radiomics_distance_of_slices([real_fov[:, :, k] for k in range(len(picked))],
                                                  [fake_fov[:, :, k] for k in range(len(picked))], volume.spacing)
    mri_frd = frechet_radiomics_distance_of_slices(held_out_mri(), mri, (2.0, 2.0))
    tiles = []
    for k in (8, 16):
        tiles += [(condition.array[:, :, k], f"held-out label map\nslice {picked[k]}", (0.0, 118.0)),
                  (fake[:, :, k], "generated CT (ct-chest-2d)", CT_WINDOW), (real[:, :, k], "real CT", CT_WINDOW)]
    tiles += [(m, f"generated MRI {i + 1} (mri-t1-2d)", (0.0, 1.0)) for i, m in enumerate(mri[:3])]
    lung = hu.get("lungs", {})
    title = (f"Generation: CT from held-out label maps (lungs {lung.get('generated', float('nan')):.0f} HU, real "
             f"{lung.get('real', float('nan')):.0f}; FRD {ct_frd:.2f}) and brain MRI slices (FRD {mri_frd:.2f})")
    save_panel(tiles, out / "generate_panel.png", title)
    return {"ct": {"model": "ct-chest-2d", "condition": "the chest CT's held-out slab label map (20 slices)",
                   "steps": 30, "seconds": round(ct_seconds, 1), "mean_hu": hu, "frd": ct_frd},
            "mri": {"model": "mri-t1-2d", "n": MRI_SAMPLES, "steps": 20, "seconds": round(mri_seconds, 1),
                    "frd": mri_frd, "real": "16 MNI152 slices between the training slices, 2 mm"}}


def held_out_mri(count: int | None = 16) -> list[np.ndarray]:
    """MNI152 slices the generator never saw (odd indices along each axis; it trains on every second slice), in
    its units (meddiff's MR normalisation to [0, 1]) at its 2 mm: ``count`` of them evenly spread, or all."""
    import nibabel as nib
    import torch

    from meddiff.data.transforms import NormalizeIntensityd

    volume = np.asarray(nib.load(str(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"))).dataobj,
                        dtype=np.float32)
    low, high = NormalizeIntensityd("image").intensity_range(torch.from_numpy(volume), "MR")
    volume = np.clip((volume - low) / (high - low), 0.0, 1.0)
    slices = [np.take(volume, k, axis=axis) for axis in range(3) for k in range(1, volume.shape[axis], 2)]
    slices = [s for s in slices if (s > 0.1).mean() >= 0.1]  # as the training slices: not nearly all background
    if count is not None:
        slices = [slices[i] for i in np.linspace(0, len(slices) - 1, count).round().astype(int)]
    return [s[: s.shape[0] // 2 * 2, : s.shape[1] // 2 * 2].reshape(s.shape[0] // 2, 2, s.shape[1] // 2, 2)
            .mean(axis=(1, 3)) for s in slices]


def _shift(k: int) -> np.ndarray:
    """The affine step to voxel slice ``k``."""
    shift = np.eye(4)
    shift[2, 3] = k
    return shift


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (the demo replaces its own files there)")
    parser.add_argument("--docs", help="also copy the panels, summary.json and the printed table here (README's)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "held_out"
    write_samples(samples, names=["chest_ct_test"], overwrite=True)
    volume = load_image(samples / "chest_ct_test.nii.gz", modality="CT")
    labels = load_image(samples / "chest_ct_test_labels.nii.gz")
    summary, seconds = {}, {}
    for name, use in (("denoise", lambda: denoise(out)), ("inpaint", lambda: inpaint(out, volume)),
                      ("generate", lambda: generate(out, volume, labels))):
        start = time.perf_counter()
        summary[name] = use()
        seconds[name] = round(time.perf_counter() - start, 1)
    summary["seconds"] = seconds
    with atomic_path(out / "summary.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    d, i, g = summary["denoise"], summary["inpaint"], summary["generate"]
    lungs = g["ct"]["mean_hu"].get("lungs", {})
    rows = [
        ("denoise", "mri-denoise", f"PSNR {d['noisy_psnr_db']:.2f} -> {d['denoised_psnr_db']:.2f} dB, "
                                   f"SSIM {d['noisy_ssim']:.3f} -> {d['denoised_ssim']:.3f}"),
        ("inpaint", "ct-inpaint", f"MAE {i['ct_mae_hu']:.0f} HU inside the region"),
        ("inpaint", "mri-inpaint", f"PSNR {i['mr_psnr_db']:.1f} dB inside the region"),
        ("generate", "ct-chest-2d", f"lungs {lungs.get('generated', float('nan')):.0f} HU (real "
                                    f"{lungs.get('real', float('nan')):.0f}), FRD {g['ct']['frd']:.2f}"),
        ("generate", "mri-t1-2d", f"{MRI_SAMPLES} slices in {g['mri']['seconds']:.0f} s, FRD {g['mri']['frd']:.2f}"),
    ]
    table = "\n".join([f"{'use':<9} {'model':<12} result",
                       *(f"{use:<9} {model:<12} {result}" for use, model, result in rows)])
    print(f"\n{table}")
    print(f"\npanels: {out}/denoise_panel.png, inpaint_panel.png, generate_panel.png; summary: {out}/summary.json "
          f"({sum(seconds.values()):.0f} s)")
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for name in ("denoise_panel.png", "inpaint_panel.png", "generate_panel.png", "summary.json"):
            shutil.copyfile(out / name, docs / name)
        (docs / "demo_table.txt").write_text(table + "\n")


if __name__ == "__main__":
    main()
