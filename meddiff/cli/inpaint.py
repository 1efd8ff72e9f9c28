"""``meddiff inpaint -i IMAGE --mask MASK -o OUT [--model NAME|DIR]``: fill the masked region.

The model decides the method: a mask-conditioned model (``task`` "inpaint") fills in one pass, any other
runs RePaint. Without ``--model`` the bundled model of the image's modality is used (MR: ``mri-inpaint``,
CT: ``ct-inpaint``); a NIfTI carries no modality, so ``--modality`` names it.

torch loads inside ``run``, so ``meddiff --help`` stays fast. Every argument, the mask and the outputs
are checked before sampling starts; outputs are written whole or not at all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from meddiff.cli import dicom_output
from meddiff.cli.bounds import SEED_MAX, check_seed
from meddiff.errors import MeddiffError
from meddiff.files import full_suffix

MAX_SAMPLES = 100  # fills per run: each is a full sampling of the region; more is a loop over --seed


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "inpaint", help="fill a masked region of an image with a diffusion model (mask-conditioned or RePaint; "
                   "2D/3D, NIfTI/DICOM)"
    )
    p.add_argument("-i", "--input", required=True, help="image file or DICOM folder")
    p.add_argument("--mask", required=True,
                   help="mask image: 1 (or any one positive value) where the image is filled, 0 where it is kept; "
                        "on another grid it is resampled by its geometry")
    p.add_argument("-o", "--output", required=True,
                   help="output file (.nii.gz, .mha, .png, ...), or with --format dcm (or a .dcm name) DICOM: "
                        "for DICOM input a new series of its study")
    p.add_argument("--model",
                   help="model folder (meddiff export) or bundled model name: a mask-conditioned model fills in one "
                        "pass; any unconditional, class- or report-conditioned model runs RePaint "
                        "(default: mri-inpaint for MR, ct-inpaint for CT)")
    p.add_argument("--modality", type=str.upper, choices=["CT", "MR"],  # pipelines.inpaint.DEFAULT_MODELS' keys
                   help="the image's modality where the file has none (NIfTI), to pick the default model; "
                        "refused when it contradicts the file's own (a DICOM header)")
    p.add_argument("--steps", type=int,
                   help="sampling steps (default: the model's inpaint_steps for a mask-conditioned model, else 50)")
    p.add_argument("--resample", type=int, default=5,
                   help="passes over each stretch of --jump steps (RePaint's resampling; 1: none)")
    p.add_argument("--jump", type=int, default=10, help="length of RePaint's jumps back, in steps")
    p.add_argument("--scheduler", default="ddpm", help="ddpm (RePaint's own) or ddim")
    p.add_argument("--samples", type=int, default=1,
                   help=f"fills to make, 1 to {MAX_SAMPLES}; OUT gets _1, _2, ... before its suffix when more than 1")
    p.add_argument("--seed", type=int, default=0,
                   help=f"sample k of slice s (of S slices) uses seed + k * S + s; 0 .. {SEED_MAX}")
    add_conditioned_options(p)
    p.set_defaults(func=run, resume_hint="fills are written only once all are made: none was written, unless the "
                                         "interrupt came while they were saved (see which -o files exist)")


def add_conditioned_options(p) -> None:
    """The options of a verb that samples a scan with a model's own conditioning (inpaint, edit): report and
    guidance, class, batch, series, device, overwrite and DICOM output."""
    p.add_argument("--prompt", help="report text to sample toward (report-conditioned models)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance with --prompt")
    p.add_argument("--negative-prompt", default="", help="report to steer away from (default: the empty report)")
    p.add_argument("--class-label", type=int, help="class to sample toward (class-conditioned models)")
    p.add_argument("--batch-size", type=int, default=8, help="slices (or tiles) per network call")
    p.add_argument("--series", help="series UID or number when a DICOM folder holds several")
    p.add_argument("--device", default="cpu")
    p.add_argument("--overwrite", action="store_true")
    dicom_output.add_options(p)


def check_samples(samples: int) -> None:
    """``--samples`` of a verb that writes one output per sample (inpaint, edit): 1 to ``MAX_SAMPLES``."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise MeddiffError(f"--samples must be 1 to {MAX_SAMPLES}, not {samples} — run again with another --seed "
                           "for more")


def check_sample_outputs(image, outputs: list[Path], args, dicom: bool, noun: str) -> None:
    """Before any work: each DICOM output can hold the image's objects, and the disk can hold ``args.samples``
    results (an uncompressed float32 upper bound each), said on stderr when there are several."""
    from meddiff.outputs import check_free_space, size

    for out in outputs if dicom else []:
        dicom_output.check_dicom_shape(out, image.array.shape, args.input, args.series)
    if args.samples > 1:
        needed = image.array.nbytes * args.samples
        check_free_space(Path(args.output).parent, needed, f"{args.samples} {noun}", "ask for fewer (--samples)")
        print(f"{args.samples} {noun} of {' x '.join(map(str, image.array.shape))}: up to {size(needed)}",
              file=sys.stderr)


def output_paths(output: str, samples: int) -> list[Path]:
    """OUT for one sample, else OUT_1, OUT_2, ... (the number before the full suffix)."""
    path = Path(output)
    if samples == 1:
        return [path]
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    return [path.with_name(f"{stem}_{k}{suffix}") for k in range(1, samples + 1)]


def run(args) -> None:
    from meddiff.io import load_image, save_image
    from meddiff.pipelines import load_pipeline
    from meddiff.pipelines.inpaint import default_model, mask_on_grid

    dicom = dicom_output.check_output_kind(args, "inpaint")
    check_seed(args.seed)
    check_samples(args.samples)
    outputs = output_paths(args.output, args.samples)
    sources = {"the input": args.input, "the mask": args.mask}
    with dicom_output.guarded(args, outputs, sources):  # before minutes of work, not after; the outputs locked
        image = load_image(args.input, series=args.series, modality=args.modality)
        differ = dicom_output.check_subject(args.input, args.mask, "the mask", args, args.series)
        check_sample_outputs(image, outputs, args, dicom, "fills")
        mask = load_image(args.mask)
        fill = mask_on_grid(image, mask)  # a bad mask is refused before the model loads; resampled once
        model = args.model or default_model(image.modality)
        pipeline = load_pipeline(model, device=args.device)
        fields = {"scheduler": args.scheduler, "resample": args.resample, "jump": args.jump,
                  "class_label": args.class_label, "guidance_scale": args.guidance_scale,
                  "negative_prompt": args.negative_prompt}
        if args.steps is not None:  # else the model's own default (DiffusionPipeline.inpaint)
            fields["steps"] = args.steps
        method = "mask-conditioned" if pipeline.config.task == "inpaint" else "RePaint"
        filled = pipeline.inpaint(image, fill, seed=args.seed, samples=args.samples, prompt=args.prompt,
                                  batch_size=args.batch_size, **fields)
        for k, (result, out) in enumerate(zip(filled, outputs, strict=True)):
            if dicom:
                description = dicom_output.provenance(
                    f"inpainted by meddiff ({method}, model {pipeline.model.weights_sha256[:16]}, seed {args.seed}, "
                    f"sample {k + 1}); outside the mask the source image", differ)
                dicom_output.write(result, out, args, args.input, "inpaint", description)
            else:
                save_image(result, out, overwrite=args.overwrite)
            print(f"wrote {out} ({' x '.join(map(str, result.array.shape))})")
