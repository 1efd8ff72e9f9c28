"""``meddiff convert IN OUT``: change format (e.g. a DICOM series folder to .nii.gz), geometry kept."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from meddiff.cli import dicom_output
from meddiff.errors import MeddiffError
from meddiff.files import full_suffix
from meddiff.image import Image
from meddiff.io import PICTURE_SUFFIXES, is_dicom_path, load_image, save_image
from meddiff.io.dicom import identity
from meddiff.io.dicom_seg import write_seg

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert between formats (DICOM, NIfTI, MHA/NRRD, PNG/JPEG)")
    p.add_argument("input", help="image file or DICOM folder")
    p.add_argument("output", help="output file (the suffix chooses the format), or with --format dcm a folder")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--modality", help="set the modality (NIfTI and pictures carry none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    dicom_output.add_options(p, send=False, seg=True, pairs="the --template")
    p.add_argument("--threshold", type=float,
                   help="with --format seg: a probability map becomes the mask of voxels above this value")
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
    if args.threshold is not None and args.format != "seg":
        raise MeddiffError("--threshold turns a probability map into a SEG mask: use it with --format seg")
    sources = {"the input": args.input, "the template": args.template}
    with dicom_output.guarded(args, [Path(args.output)], sources) as dicom:
        template = identity(Path(args.template)) if args.template else None  # read once for both checks
        differ = dicom_output.check_subject(args.input, args.template, "the template", args, args.series, template)
        image = load_image(args.input, series=args.series, modality=args.modality)
        if args.format == "seg":
            out = write_seg(_mask_values(image, args.threshold), args.template, args.output, overwrite=args.overwrite)
            print(f"wrote {out} (DICOM SEG of {args.template})")
            return
        if dicom:
            if template:
                dicom_output.check_modalities(image.modality, template["Modality"], f"the template {args.template}")
            dicom_output.check_dicom_shape(Path(args.output), image.array.shape, args.template or args.input,
                                           args.series)
            description = dicom_output.provenance(f"converted by meddiff from {Path(args.input).name}", differ)
            out = dicom_output.write(image, Path(args.output), args, args.template or args.input, "convert",
                                     description)
            print(f"wrote {out} ({' x '.join(map(str, image.array.shape))}, DICOM)")
            return
        suffix = full_suffix(args.output)
        if suffix in PICTURE_SUFFIXES and not _plain_grid(image.affine):
            spacing = " x ".join(f"{s:g}" for s in image.spacing)
            log.warning("%s keeps no geometry: the %s mm spacing, orientation and position are dropped — write "
                        ".nii.gz, .mha or .nrrd to keep them", suffix, spacing)
        out = save_image(image, args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({' x '.join(map(str, image.array.shape))}, {image.orientation})")


def _mask_values(image: Image, threshold: float | None) -> Image:
    """The label map a SEG holds: whole numbers as given; a fractional (probability) map only through
    ``--threshold`` (voxels above it are 1), never silently rounded."""
    values = image.array
    if threshold is None:
        if not np.array_equal(values, np.round(values)):
            low, high = float(values.min()), float(values.max())
            raise MeddiffError(f"the input holds fractional values ({low:.3g}..{high:.3g}): a SEG holds masks or "
                               "label maps — pass --threshold T to keep voxels above T")
        return image
    if not math.isfinite(threshold):
        raise MeddiffError(f"--threshold must be a finite number, not {threshold}")
    return Image((values > threshold).astype(np.float32), image.affine, image.modality)


def _plain_grid(affine: np.ndarray) -> bool:
    """1 mm pixels, axis-aligned, at the origin: all a picture can say about geometry."""
    return bool(np.allclose(np.abs(affine[:3, :3]), np.eye(3), atol=1e-6) and np.allclose(affine[:3, 3], 0, atol=1e-6))
