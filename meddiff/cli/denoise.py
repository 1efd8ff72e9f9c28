"""``meddiff denoise -i IN -o OUT [--model NAME|DIR]``: noise-level-matched denoising; geometry and units kept.

torch loads inside ``run``, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from meddiff.cli import dicom_output
from meddiff.errors import MeddiffError
from meddiff.files import check_writable
from meddiff.io import load_image, save_image

DEFAULT_MODEL = "mri-denoise"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("denoise", help="denoise an MR image with a diffusion model (NIfTI/DICOM, 2D/3D/4D)")
    p.add_argument("-i", "--input", required=True, help="image file or DICOM folder")
    p.add_argument("-o", "--output", required=True,
                   help="output file (.nii.gz, .mha, ...), or with --format dcm a folder for the DICOM series")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"bundled model name or model folder (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--noise-sigma", default="auto",
                   help="'auto' (estimated from the image) or the noise sigma in image units")
    p.add_argument("--strength", type=float, help="remove strength x sigma (default: the model's calibrated value)")
    p.add_argument("--steps", type=int, default=1,
                   help="1: posterior-mean estimate (best PSNR); more: reverse-process sampling")
    p.add_argument("--samples", type=int, default=1, help="with --steps > 1: average this many samples")
    p.add_argument("--no-rician-correction", dest="rician_correction", action="store_false",
                   help="keep the Rician noise floor (about 1.25 x sigma in air and dark tissue) "
                        "that is removed by default from non-negative MR")
    p.add_argument("--mask", help="mask image on the same grid: only voxels inside it are denoised")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    dicom_output.add_options(p)
    p.set_defaults(func=run)


def noise_sigma(text: str) -> float | None:
    """``--noise-sigma``: None for 'auto', else a positive, finite number of image units."""
    if text == "auto":
        return None
    try:
        sigma = float(text)
    except ValueError:
        sigma = math.nan
    if not (math.isfinite(sigma) and sigma > 0):
        raise MeddiffError(f"--noise-sigma must be 'auto' or a positive number in image units, not {text!r} — "
                           "give the noise level's standard deviation, or 'auto' to estimate it")
    return sigma


def run(args) -> None:
    from meddiff.pipelines import load_pipeline

    sigma = noise_sigma(args.noise_sigma)
    if args.strength is not None and not (math.isfinite(args.strength) and args.strength > 0):
        raise MeddiffError(f"--strength must be a positive number, not {args.strength} "
                           "— e.g. 1 removes the whole noise sigma, or leave it out")
    if args.steps < 1 or args.samples < 1:
        raise MeddiffError("--steps and --samples must be at least 1 — --steps 1 gives the posterior-mean estimate")
    dicom = dicom_output.check(args, [Path(args.output)])  # before minutes of work, not after
    if not dicom:
        check_writable(args.output, args.overwrite)
    image = load_image(args.input, series=args.series)
    mask = None
    if args.mask:
        mask_image = load_image(args.mask)
        mask = mask_image.array > 0
        if mask.shape[:3] != image.array.shape[:3] or not np.allclose(mask_image.affine, image.affine, atol=1e-3):
            raise MeddiffError(f"the mask {args.mask} is not on the image's voxel grid "
                               f"(shape {mask.shape} vs {image.array.shape})")
    pipeline = load_pipeline(args.model, device=args.device)
    clean = pipeline.denoise(image, noise_sigma=sigma, steps=args.steps, samples=args.samples, strength=args.strength,
                             mask=mask, rician_correction=args.rician_correction)
    if dicom:
        description = (f"denoised by meddiff (model {pipeline.model.weights_sha256[:16]}, steps {args.steps}, "
                       f"noise sigma {args.noise_sigma})")
        out = dicom_output.write(clean, Path(args.output), args, args.input, "denoise", description)
    else:
        out = save_image(clean, args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({' x '.join(map(str, clean.array.shape))})")
