"""``meddiff info PATH``: shape, geometry, modality and intensity statistics of an image."""

from __future__ import annotations

import json

import numpy as np

from meddiff.image import Image
from meddiff.io import load_image


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="describe an image (shape, spacing, affine, orientation, statistics)")
    p.add_argument("path", help="NIfTI, DICOM file or folder, MHA/NRRD, PNG/JPEG")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def describe(image: Image) -> dict:
    """A JSON-friendly summary of an image (no identifiers: ``meta`` is allow-listed)."""
    a = image.array.astype(np.float64)  # float32 sums of squares overflow on large intensities (std would read inf)
    p1, p50, p99 = np.percentile(a, [1, 50, 99])
    return {
        "shape": list(a.shape),
        "spacing": [round(s, 6) for s in image.spacing],
        "orientation": image.orientation,
        "affine": np.round(image.affine, 6).tolist(),
        "modality": image.modality,
        "stats": {k: float(v) for k, v in {"min": a.min(), "max": a.max(), "mean": a.mean(), "std": a.std(),
                                           "p1": p1, "median": p50, "p99": p99}.items()},
        "meta": image.meta,
    }


def run(args) -> None:
    summary = describe(load_image(args.path, series=args.series))
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"shape        {' x '.join(map(str, summary['shape']))}")
    print(f"spacing      {' x '.join(f'{s:g}' for s in summary['spacing'])} mm")
    print(f"orientation  {summary['orientation']}")
    print(f"modality     {summary['modality'] or 'unknown'}")
    s = summary["stats"]
    print(f"intensity    min {s['min']:.6g}  max {s['max']:.6g}  mean {s['mean']:.6g}  std {s['std']:.6g}")
    print(f"percentiles  1% {s['p1']:.6g}  50% {s['median']:.6g}  99% {s['p99']:.6g}")
    print("affine (voxel -> RAS+ mm)")
    for row in summary["affine"]:
        print("  " + " ".join(f"{v:11.4f}" for v in row))
