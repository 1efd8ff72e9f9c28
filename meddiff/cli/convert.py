"""``meddiff convert IN OUT``: change format (e.g. a DICOM series folder to .nii.gz), geometry kept."""

from __future__ import annotations

from meddiff.io import load_image, save_image


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between formats (DICOM, NIfTI, MHA/NRRD, PNG/JPEG)")
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("output", help="output file; the suffix chooses the format")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--modality", help="set the modality (NIfTI and pictures carry none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args) -> None:
    image = load_image(args.input, series=args.series, modality=args.modality)
    out = save_image(image, args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({' x '.join(map(str, image.array.shape))}, {image.orientation})")
