"""``meddiff denoise -i IN -o OUT [--model NAME|DIR] [--report]``: noise-level-matched denoising; geometry and units
kept; with ``--report`` a no-reference quality report beside the output (``OUT.report.json``).

torch loads inside ``run``, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from meddiff.cli import dicom_output
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io import load_image, save_image
from meddiff.pipelines.spec import DenoiseSpec

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
    p.add_argument("--strength", type=float,
                   help=f"remove strength x sigma, in (0, {DenoiseSpec.MAX_STRENGTH:g}] "
                        "(default: the model's calibrated value)")
    p.add_argument("--steps", type=int, default=1,
                   help=f"1: posterior-mean estimate (best PSNR); more (up to {DenoiseSpec.MAX_STEPS}): "
                        "reverse-process sampling")
    p.add_argument("--samples", type=int, default=1,
                   help=f"with --steps > 1: average this many samples (1 to {DenoiseSpec.MAX_SAMPLES})")
    p.add_argument("--seed", type=int, default=0, help="with --steps > 1: sample k uses seed + k; 0 .. 2**32 - 1")
    p.add_argument("--no-rician-correction", dest="rician_correction", action="store_false",
                   help="keep the Rician noise floor (about 1.25 x sigma in air and dark tissue) that is "
                        "removed by default from non-negative MR where its background and tissue agree on sigma")
    p.add_argument("--noise-map", metavar="estimate|FILE",
                   help="noise that varies across the image (parallel imaging, surface coils): 'estimate' a map from "
                        "the image, or a map of the noise sigma per voxel on the image's grid (NIfTI, ...); each tile "
                        "is matched to its own noise")
    p.add_argument("--across-volumes", action="store_true",
                   help="a 4D series (diffusion-weighted, fMRI, multi-echo): predict each volume from the others "
                        "first (their noise is independent), then denoise that prediction in space")
    p.add_argument("--coils", type=int, default=1,
                   help="receive coils combined by root-sum-of-squares into the magnitude image: its noise is "
                        "noncentral chi with 2N degrees of freedom, and the noise estimate and the floor removal "
                        "follow it (default 1: Rician)")
    p.add_argument("--mask", help="binary mask image (NIfTI, DICOM SEG, ...): only voxels inside it are denoised; "
                                  "on another grid it is resampled by its geometry")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--report", action="store_true",
                   help="also write OUTPUT.report.json beside the output: the noise before and after and whether the "
                        "residual (input - output) looks like noise, judged without a clean image (heuristics)")
    p.add_argument("--adapt", nargs="?", type=int, const=DenoiseSpec.ADAPT_STEPS, metavar="STEPS",
                   help=f"first adapt the model to this scan: STEPS (default {DenoiseSpec.ADAPT_STEPS}) of "
                        "self-supervised fine-tuning on the scan's own noise (Recorrupted-to-Recorrupted), kept only "
                        "where it lowers the loss on held-out planes; about a minute on a CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    dicom_output.add_options(p)
    p.set_defaults(func=run)


def report_path(output: Path) -> Path:
    """Where ``--report`` writes: beside the output (a file or a series folder), named after it in full."""
    return output.with_name(f"{output.name}.report.json")


@contextlib.contextmanager
def reserved(path: Path, sources: Mapping[str, str | None], overwrite: bool) -> Iterator[None]:
    """Check the report's path before any work, as ``guarded`` checks the output's (never an input, never replaced
    without ``--overwrite``), and hold its lock until the report is written."""
    from meddiff.files import check_writable
    from meddiff.outputs import check_not_source, output_lock

    check_not_source(path, sources)
    with output_lock(path):
        check_writable(path, overwrite)
        yield


def write_report(path: Path, out: Path, report: dict, model: str, spec: DenoiseSpec, overwrite: bool,
                 adaptation: dict | None = None) -> None:
    """The report as JSON at ``path``, with what ties it to ``out``: its name and SHA-256, the model, the spec and
    what adapting the model to the scan did (``--adapt``)."""
    from meddiff import __version__
    from meddiff.files import file_sha256
    from meddiff.outputs import locked_atomic_path

    document = {"output": out.name, "output_sha256": file_sha256(out), "model": model,
                "spec": spec.model_dump(mode="json"), "adaptation": adaptation, "meddiff": __version__,
                "limits": "heuristics for a first look, not validated acceptance criteria "
                          "(meddiff.diffusion.quality.LIMITS)", **report}
    with locked_atomic_path(path, overwrite) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")


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
    from meddiff.diffusion.quality import summary
    from meddiff.pipelines import load_pipeline
    from meddiff.pipelines.denoise import spec_after
    from meddiff.pipelines.inpaint import mask_on_grid
    from meddiff.pipelines.spec import check_adapt_steps, spec_from

    if args.adapt is not None:
        check_adapt_steps(args.adapt)
    spec = spec_from(DenoiseSpec, steps=args.steps, samples=args.samples, strength=args.strength, seed=args.seed,
                     noise_sigma=noise_sigma(args.noise_sigma), rician_correction=args.rician_correction,
                     coils=args.coils, local_noise=args.noise_map == "estimate", across_volumes=args.across_volumes)
    given_map = args.noise_map if args.noise_map not in (None, "estimate") else None
    sources = {"the input": args.input, "the mask": args.mask, "the noise map": given_map}
    reporting = report_path(Path(args.output)) if args.report else None
    with (dicom_output.guarded(args, [Path(args.output)], sources) as dicom,  # before minutes of work, not after
          reserved(reporting, sources, args.overwrite) if reporting else contextlib.nullcontext()):
        image = load_image(args.input, series=args.series)
        if dicom:
            dicom_output.check_dicom_shape(Path(args.output), image.array.shape, args.input, args.series)
        mask, differ = None, dicom_output.check_subject(args.input, args.mask, "the mask", args, args.series)
        if args.mask:
            mask = mask_on_grid(Image(image.array[..., 0] if image.array.ndim == 4 else image.array, image.affine,
                                      image.modality), load_image(args.mask), verb="denoise")
            if image.array.ndim == 4:
                mask = np.broadcast_to(mask[..., None], image.array.shape)
        noise_map = None if given_map is None else load_image(given_map).array
        pipeline = load_pipeline(args.model, device=args.device)
        spec = spec.checked(pipeline.config)  # the model's own strength and tile filled in
        adaptation = None
        if args.adapt is not None:
            pipeline, adaptation = pipeline.adapt(image, spec, args.adapt)
            print(adaptation.describe())
            spec = spec_after(adaptation, spec, noise_map)  # at the noise it adapted at
        clean = pipeline.denoise(image, spec, mask=mask, noise_map=noise_map)
        report = pipeline.denoise_report(image, clean, spec, mask) if reporting else None
        if dicom:  # of the report only its summary: a DerivationDescription holds 1024 characters
            settings = (spec.description() + (f"; noise map given ({Path(given_map).name})" if given_map else "")
                        + (f"; {adaptation.describe()}" if adaptation else "")
                        + (f"; report beside the series: {summary(report)}" if report else ""))
            description = dicom_output.provenance(
                f"denoised by meddiff (model {pipeline.model.weights_sha256[:16]}; {settings})", differ)
            out = dicom_output.write(clean, Path(args.output), args, args.input, "denoise", description)
        else:
            out = save_image(clean, args.output, overwrite=args.overwrite)
        if reporting:  # after the output: the report names its SHA-256
            write_report(reporting, out, report, pipeline.model.weights_sha256, spec, args.overwrite,
                         dataclasses.asdict(adaptation) if adaptation else None)
    print(f"wrote {out} ({' x '.join(map(str, clean.array.shape))})")
    if reporting:
        print(f"wrote {reporting} ({summary(report)})")
