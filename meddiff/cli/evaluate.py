"""``meddiff evaluate --real A --fake B``: distribution and paired metrics in medical feature spaces.

torch loads inside ``run``, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import atomic_path

DEFAULT_CACHE = Path.home() / ".cache" / "meddiff" / "features"
# meddiff.encoders.openclip.BIOMEDCLIP, without importing torch
BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate",
                              help="compare generated and real images (FID, precision/recall, density/coverage, "
                                   "memorisation, PSNR/SSIM, CLIP score)")
    p.add_argument("--real", required=True, help="manifest, folder with manifest.jsonl, or folder of images")
    p.add_argument("--fake", required=True,
                   help="manifest, folder with manifest.jsonl (meddiff generate output), or folder of images")
    p.add_argument("--real-split", help="only this split of the real manifest (e.g. test)")
    p.add_argument("--train", help="the training images, for memorisation (default: --real)")
    p.add_argument("--features", default="meddiff_mri",
                   help="feature extractor: meddiff_mri, radimagenet_resnet50, xrv_densenet121, "
                        "biomedclip, inception_v3 (ImageNet-comparable FID), medicalnet_resnet10, medicalnet_resnet50")
    p.add_argument("--weights",
                   help="the extractor's pretrained weights file, or for biomedclip a folder / local-dir:PATH / "
                        "hf-hub:REPO (default: found by name under $MEDDIFF_WEIGHTS)")
    p.add_argument("--metrics", default="fid,prdc",
                   help="comma-separated: fid, prdc, memorization, paired, frd (radiomics, no network), "
                        "clip (CLIP score of the fake images against their manifest reports)")
    p.add_argument("--clip", default=f"hf-hub:{BIOMEDCLIP}",
                   help="image-text encoder for --metrics clip: hf-hub:REPO (pre-filled Hugging Face "
                        "cache) or local-dir:PATH (open_clip folder); default BiomedCLIP")
    p.add_argument("--plane", choices=["axial", "coronal", "sagittal", "all"],
                   help="compare volumes as slices of this plane (2D images against volumes)")
    p.add_argument("-k", type=int, default=3,
                   help="nearest neighbours for precision/recall (density/coverage use max(k, 5))")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="feature cache folder ('none' to disable)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    p.add_argument("--plot", help="PNG of the generated images closest to training images (with memorization)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def finite_json(value):
    """Standard JSON has no Infinity/NaN (PSNR of identical images is +inf): those become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_json(v) for v in value]
    return value


def run(args) -> None:
    from meddiff.metrics.evaluate import (
        NO_FEATURES,
        check_k,
        check_metrics,
        evaluate,
        image_paths,
        image_reports,
        plot_closest_pairs,
        table,
    )
    from meddiff.metrics.features import load_extractor

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    check_metrics(metrics)
    check_k(args.k)
    for out in (args.json_out, args.plot):  # refused before any work; folders are made only when writing
        if out and Path(out).is_dir():
            raise MeddiffError(f"{out} is a folder — give a file name")
        if out and Path(out).exists() and not args.overwrite:
            raise MeddiffError(f"{out} already exists — choose another output or pass --overwrite")
    if args.plot and "memorization" not in metrics:
        raise MeddiffError("--plot shows the closest training images: add memorization to --metrics")
    real, fake = image_paths(args.real, args.real_split), image_paths(args.fake)
    train = image_paths(args.train) if args.train else None
    clip = reports = None
    if "clip" in metrics:
        from meddiff.encoders.openclip import load_open_clip

        reports = image_reports(args.fake)
        clip = load_open_clip(args.clip)
    extractor = load_extractor(args.features, args.weights) if set(metrics) - set(NO_FEATURES) else None
    cache = None if args.cache == "none" else Path(args.cache)
    results = evaluate(real, fake, extractor, metrics, train=train, cache_dir=cache, k=args.k, plane=args.plane,
                       clip=clip, reports=reports)
    print(table(results))
    if args.json_out:
        with atomic_path(args.json_out, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps(finite_json(results), indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json_out}")
    if args.plot:
        pairs = next(iter(results["closest_pairs"].values()))
        print(f"wrote {plot_closest_pairs(pairs, args.plot)}")
