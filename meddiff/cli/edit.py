"""``meddiff edit -i IMAGE -o OUT --model M --strength S [--prompt TEXT | --class-label N] [--mask MASK]``: SDEdit.

The image is noised part-way (``--strength``) and denoised by a generating model under a new condition; with
``--mask`` only the masked region changes. Provenance: a DICOM output (a derived series of a DICOM input's study)
records the strength, model, seed, condition and the input's SHA-256 in its DerivationDescription; any other output
gets a JSON record beside it (``OUT.json``, as generate's manifest records its items' provenance).

torch loads inside ``run``, so ``meddiff --help`` stays fast. Every argument, the mask and the outputs are checked
before sampling starts; outputs are written whole or not at all.
"""

from __future__ import annotations

import json
from pathlib import Path

from meddiff.cli import dicom_output
from meddiff.cli.bounds import SEED_MAX, check_seed
from meddiff.cli.inpaint import (
    MAX_SAMPLES,
    add_conditioned_options,
    check_sample_outputs,
    check_samples,
    output_paths,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "edit", help="edit an image with a generating diffusion model (SDEdit: noise it part-way, denoise it toward "
                     "a report or class; --mask keeps the rest exactly)"
    )
    p.add_argument("-i", "--input", required=True, help="image file or DICOM folder")
    p.add_argument("-o", "--output", required=True,
                   help="output file (.nii.gz, .mha, .png, ...), with OUT.json beside it, or with --format dcm (or a "
                        ".dcm name) DICOM: for DICOM input a new series of its study")
    p.add_argument("--model", required=True,
                   help="generating model: bundled name (mri-t1-2d) or model folder (unconditional, class- or "
                        "report-conditioned, pixel space)")
    p.add_argument("--strength", type=float, required=True,
                   help="in (0, 1]: how far back the edit starts, the share of --steps that run; low stays close "
                        "to the input, 1 follows the condition alone")
    p.add_argument("--mask", help="mask image: 1 (or any one positive value) where the image may change, 0 where it "
                                  "is kept bit for bit; on another grid it is resampled by its geometry")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the whole schedule (strength x steps run)")
    p.add_argument("--scheduler", help="sampler (default: the model's own; with --mask ddpm or ddim)")
    p.add_argument("--samples", type=int, default=1,
                   help=f"edits to make, 1 to {MAX_SAMPLES}; OUT gets _1, _2, ... before its suffix when more than 1")
    p.add_argument("--seed", type=int, default=0,
                   help=f"sample k of slice s (of S slices) uses seed + k * S + s; 0 .. {SEED_MAX}")
    add_conditioned_options(p)
    p.set_defaults(func=run, resume_hint="edits are written only once all are made: none was written, unless the "
                                         "interrupt came while they were saved (see which -o files exist)")


def record_path(output: Path) -> Path:
    """Where an output's provenance is written: beside it, named after it in full (``edited.nii.gz.json``)."""
    return output.with_name(f"{output.name}.json")


def condition_words(spec, prompt: str | None) -> str:
    """The condition an edit followed, for a DerivationDescription."""
    words = "" if spec.class_label is None else f", class {spec.class_label}"
    if prompt is not None:
        words += f", prompt {prompt!r}"
        if spec.guided:
            words += f", guidance {spec.guidance_scale:g}" + (f" from {spec.negative_prompt!r}"
                                                               if spec.negative_prompt else "")
    return words


def run(args) -> None:
    from meddiff import __version__
    from meddiff.files import file_sha256
    from meddiff.io import load_image, save_image
    from meddiff.outputs import locked_atomic_path
    from meddiff.pipelines import load_pipeline
    from meddiff.pipelines.edit import EditSpec
    from meddiff.pipelines.inpaint import mask_on_grid
    from meddiff.pipelines.spec import spec_from

    dicom = dicom_output.check_output_kind(args, "edit")
    check_seed(args.seed)
    check_samples(args.samples)
    spec = spec_from(EditSpec, strength=args.strength, steps=args.steps, scheduler=args.scheduler,
                     class_label=args.class_label, guidance_scale=args.guidance_scale,
                     negative_prompt=args.negative_prompt)
    outputs = output_paths(args.output, args.samples)
    records = [] if dicom else [record_path(out) for out in outputs]
    sources = {"the input": args.input, "the mask": args.mask}
    with dicom_output.guarded(args, outputs + records, sources):  # before minutes of work; the outputs locked
        image = load_image(args.input, series=args.series).check_finite()  # refused before the model loads
        differ = dicom_output.check_subject(args.input, args.mask, "the mask", args, args.series)
        check_sample_outputs(image, outputs, args, dicom, "edits")
        fill = None if args.mask is None else mask_on_grid(image, load_image(args.mask), verb="edit")
        input_sha256 = file_sha256(args.input)  # the bytes this edit started from, before minutes of work
        mask_sha256 = None if args.mask is None else file_sha256(args.mask)
        pipeline = load_pipeline(args.model, device=args.device)
        edited = pipeline.edit(image, spec, fill, seed=args.seed, samples=args.samples, prompt=args.prompt,
                               batch_size=args.batch_size)
        spec = spec.checked(pipeline.config)  # as it ran: the model's own scheduler filled in
        weights = pipeline.model.weights_sha256
        for k, (result, out) in enumerate(zip(edited, outputs, strict=True)):
            if dicom:
                kept = "; outside the mask the source image" if args.mask else ""
                description = dicom_output.provenance(
                    f"edited by meddiff (SDEdit, strength {spec.strength:g} of {spec.steps} steps, model "
                    f"{weights[:16]}, seed {args.seed}, sample {k + 1}, input sha256 {input_sha256}"
                    f"{condition_words(spec, args.prompt)}){kept}", differ)
                dicom_output.write(result, out, args, args.input, "edit", description)
            else:
                save_image(result, out, overwrite=args.overwrite)
                provenance = {"task": "edit", "model": args.model, "weights_sha256": weights, **spec.model_dump(),
                              "seed": args.seed, "sample": k + 1, "prompt": args.prompt,
                              # hashes, not file names: a scan's file name may carry the patient's name
                              "input_sha256": input_sha256, "mask_sha256": mask_sha256,
                              "output_sha256": file_sha256(out), "meddiff": __version__}
                with locked_atomic_path(record_path(out), args.overwrite) as tmp:
                    tmp.write_text(json.dumps(provenance, indent=1) + "\n")
            print(f"wrote {out} ({' x '.join(map(str, result.array.shape))})")
