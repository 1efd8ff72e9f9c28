"""``meddiff upsample -i THICK -o THIN [--spacing MM | --factor K] [--method auto|model|self|cubic]``: new slices
between a volume's thick ones (``meddiff.pipelines.upsample``); geometry exact, acquired slices kept.

Without ``--model`` the bundled model of the scan's modality is used where there is one (MR: ``mri-upsample``, CT:
``ct-upsample``); a NIfTI carries no modality, so ``--modality`` names it. A DICOM series with ``--format dcm``
comes back as a derived series of thin slices in the same study. torch loads inside ``run``.
"""

from __future__ import annotations

from pathlib import Path

from meddiff.cli import dicom_output
from meddiff.errors import MeddiffError
from meddiff.files import full_suffix


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("upsample", help="through-plane super-resolution: thin slices from a thick-slice volume "
                                               "(a diffusion model, a network trained on the scan itself, or cubic)")
    p.add_argument("-i", "--input", required=True, help="volume file (NIfTI, MHA, ...) or DICOM series folder")
    p.add_argument("-o", "--output", required=True,
                   help="output file (.nii.gz, .mha, ...), or with --format dcm a folder for the DICOM series "
                        "(for DICOM input a new series of its study)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--spacing", type=float, help="the new slice spacing in mm (default: the in-plane voxel size)")
    size.add_argument("--factor", type=float, help="new slices per acquired slice (above 1, at most 16)")
    p.add_argument("--method", choices=["auto", "model", "self", "cubic"], default="auto",
                   help="model: a super-resolution diffusion model; self: a network trained for a few minutes on the "
                        "scan's own in-plane detail (no model needed); cubic: a cubic spline; auto (default): the "
                        "best of them on the scan's held-out in-plane planes, said on the way")
    p.add_argument("--model", help="upsampling model folder or bundled name (default: mri-upsample for MR, "
                                   "ct-upsample for CT, where installed)")
    p.add_argument("--modality", type=str.upper, choices=["CT", "MR"],
                   help="the scan's modality where the file has none (NIfTI): picks the model and the intensity window")
    p.add_argument("--thickness", type=float,
                   help="the acquired slices' thickness in mm (default: the DICOM SliceThickness, else their spacing)")
    p.add_argument("--steps", type=int, default=1, help="the model's sampling steps (1: its posterior-mean estimate)")
    p.add_argument("--self-steps", type=int,
                   help="training steps of the per-scan network (default 1000: a few CPU minutes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model's noise and the per-scan network")
    p.add_argument("--batch-size", type=int, default=8, help="planes per network call")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    dicom_output.add_options(p)
    p.set_defaults(func=run)


def run(args) -> None:
    from meddiff.io import is_dicom_path, load_image, save_image
    from meddiff.pipelines.spec import spec_from
    from meddiff.pipelines.upsample import UpsampleSpec, check_upsampling_model, default_model, output_grid, upsample

    dicom = dicom_output.check_output_kind(args, "upsample")
    fields = {"spacing": args.spacing, "factor": args.factor, "method": args.method, "thickness": args.thickness,
              "steps": args.steps, "seed": args.seed}
    if args.self_steps is not None:
        fields["self_steps"] = args.self_steps
    spec = spec_from(UpsampleSpec, **fields)
    if args.batch_size < 1:
        raise MeddiffError(f"--batch-size must be at least 1, not {args.batch_size}")
    with dicom_output.guarded(args, [Path(args.output)], {"the input": args.input}):  # before any work
        image = load_image(args.input, series=args.series, modality=args.modality)
        grid = output_grid(image, spec)  # a volume that cannot be upsampled is refused before a model loads
        if dicom and full_suffix(Path(args.output)) == ".dcm":
            raise MeddiffError(f"{args.output}: the result is a series of {grid.size} DICOM objects, written as a "
                               "folder — give -o a folder name without .dcm")
        if dicom and is_dicom_path(args.input) and grid.axis != 2:  # a DICOM series' slices lie along axis 2
            raise MeddiffError(f"the thickest voxel side of {args.input} lies within its slices ({image.grid}): new "
                               "slices would not lie along the series' slice direction — write NIfTI instead")
        model = None
        if args.method in ("auto", "model"):
            name = args.model or default_model(image.modality)
            model = _load(name, given=args.model is not None, device=args.device) if name else None
        elif args.model:
            raise MeddiffError(f"--method {args.method} uses no model: leave out --model, or use --method model")
        if model is not None:
            check_upsampling_model(model)
        result, report = upsample(image, spec, model, args.batch_size)
        print(report.line())
        if dicom:
            description = (f"upsampled by meddiff ({report.method}"
                           + (f", model {model.weights_sha256[:16]}" if report.method == "model" else "")
                           + f"; {report.factor:.3g}x through-plane, slices every {report.spacing:.4g} mm; acquired "
                           "slices kept)")
            out = dicom_output.write(result, Path(args.output), args, args.input, "upsample", description,
                                     resampled=True)
        else:
            out = save_image(result, args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({' x '.join(map(str, result.array.shape))})")


def _load(name: str, given: bool, device: str):
    """The model ``name``; a bundled default that is not installed is skipped (auto then chooses without it)."""
    from meddiff.model import bundled_models, load_model

    if not given and name not in bundled_models():
        return None
    return load_model(name, device)
