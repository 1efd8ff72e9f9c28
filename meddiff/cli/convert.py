"""``meddiff convert IN OUT``: change format (e.g. a DICOM series folder to .nii.gz), geometry kept."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from meddiff.cli import dicom_output
from meddiff.errors import MeddiffError
from meddiff.files import full_suffix
from meddiff.io import PICTURE_SUFFIXES, is_dicom_path, load_image, save_image
from meddiff.io.dicom_seg import write_seg

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between formats (DICOM, NIfTI, MHA/NRRD, PNG/JPEG)")
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("output", help="output file (the suffix chooses the format), or with --format dcm a folder")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--modality", help="set the modality (NIfTI and pictures carry none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    dicom_output.add_options(p, send=False, seg=True)
    p.add_argument("--template", help="with --format dcm: the DICOM series (folder or file) the image derives from, "
                                      "on its grid; the output is a new series of its study")
    p.set_defaults(func=run)


def run(args) -> None:
    if args.template and not dicom_output.wants_dicom(args, args.output):
        raise MeddiffError("--template is for DICOM output: add --format dcm or --format seg")
    if args.format == "seg" and not args.template:
        raise MeddiffError("--format seg writes a mask or label map of a DICOM series: name it with --template")
    if args.template and not is_dicom_path(args.template):
        raise MeddiffError(f"--template {args.template} is not DICOM: give the source series' folder or file")
    dicom = dicom_output.check(args, [Path(args.output)])
    image = load_image(args.input, series=args.series, modality=args.modality)
    if args.format == "seg":
        out = write_seg(image, args.template, args.output, overwrite=args.overwrite)
        print(f"wrote {out} (DICOM SEG of {args.template})")
        return
    if dicom:
        out = dicom_output.write(image, Path(args.output), args, args.template or args.input, "convert",
                                 f"converted by meddiff from {Path(args.input).name}")
        print(f"wrote {out} ({' x '.join(map(str, image.array.shape))}, DICOM)")
        return
    suffix = full_suffix(args.output)
    if suffix in PICTURE_SUFFIXES and not _plain_grid(image.affine):
        spacing = " x ".join(f"{s:g}" for s in image.spacing)
        log.warning("%s keeps no geometry: the %s mm spacing, orientation and position are dropped — write .nii.gz, "
                    ".mha or .nrrd to keep them", suffix, spacing)
    out = save_image(image, args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({' x '.join(map(str, image.array.shape))}, {image.orientation})")


def _plain_grid(affine: np.ndarray) -> bool:
    """1 mm pixels, axis-aligned, at the origin: all a picture can say about geometry."""
    return bool(np.allclose(np.abs(affine[:3, :3]), np.eye(3), atol=1e-6) and np.allclose(affine[:3, 3], 0, atol=1e-6))
