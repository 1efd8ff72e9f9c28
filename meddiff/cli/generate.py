"""``meddiff generate --model DIR -n N -o OUTDIR``: synthetic images plus a provenance manifest.

torch and Lightning load inside ``run``, so ``meddiff --help`` stays fast. Every argument is checked
before the output folder is created; one run at a time writes into a folder (a second is refused);
Ctrl-C or SIGTERM keeps the finished images and ends with exit 130 (see ``meddiff.generation``).
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

from meddiff.cli.bounds import SEED_MAX, check_output_folder, check_seed
from meddiff.errors import MeddiffError
from meddiff.io import SYNTHETIC_FORMATS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate synthetic images and a manifest (resumable)")
    p.add_argument("--model", required=True,
                   help="bundled model name (mri-t1-2d, ct-chest-2d, ...) or model folder (meddiff export output)")
    p.add_argument("--adapter", metavar="DIR", help="a few-shot adapter folder trained on --model (LoRA or a "
                   "textual-inversion token; meddiff fit with LoRAModule / TextualInversionModule)")
    p.add_argument("--adapter-scale", type=float, metavar="S", help="weight of a LoRA adapter: 0 the base model, "
                   "1 as trained (default)")
    p.add_argument("-n", type=int, help="number of images (default with --prompts: one per prompt)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", help="ddpm, ddim, dpm++2m, euler, unipc, pndm; rflow for a rectified-flow model "
                   "(default: ddim, or rflow)")
    p.add_argument("--seed", type=int, default=0, help=f"0 .. {SEED_MAX}; image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", choices=SYNTHETIC_FORMATS, default="nii.gz")
    p.add_argument("--condition", metavar="LABELS", help="an integer label map (NIfTI, MHA, NRRD, ...) the images "
                   "follow, on its grid (models with a ControlNet)")
    p.add_argument("--class-label", type=int, help="class for class-conditioned models")
    p.add_argument("--condition-values", metavar="NAME=VALUE,...", type=condition_values,
                   help="scalar conditions by name, e.g. gender=1,age=0.6 (models with scalar conditions: the "
                        "model's card and config.json name them with their ranges and defaults)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="report text for every image (report-conditioned models)")
    prompt.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": "..."} per line, one image each')
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance: 1 conditional, 0 unconditional, >1 stronger")
    p.add_argument("--negative-prompt", default="", help="report to steer away from (default: the empty report)")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--devices", default="1", help="number of devices, a comma-separated list of device ids, or auto; "
                   "more than one runs one process per device (DDP), each writing a shard")
    # what Ctrl-C or SIGTERM leaves (meddiff.cli.main.run prints it after "interrupted — ")
    p.set_defaults(func=run, resume_hint="the finished images are kept; run the same command again to finish")


def condition_values(text: str) -> dict[str, float]:
    """``gender=1,age=0.6`` -> {"gender": 1.0, "age": 0.6}; argparse turns a ValueError into one error line."""
    values = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name.strip() or name.strip() in values:
            raise ValueError(f"{part!r} is not NAME=VALUE (each name once)")
        values[name.strip()] = float(value)
    if not values:
        raise ValueError("no NAME=VALUE given")
    return values


condition_values.__name__ = "NAME=VALUE list"  # what argparse names in its error line


def run(args) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from meddiff.generation import generate_to_folder
    from meddiff.model import load_model
    from meddiff.pipelines.spec import SamplingSpec

    if not re.fullmatch(r"auto|-1|[1-9][0-9]{0,3}|[0-9]{1,4}(,[0-9]{1,4})*,?", args.devices):
        raise MeddiffError("--devices takes a number of devices, a comma-separated list of device ids or auto, "
                           f"not {args.devices!r}")
    check_seed(args.seed)
    check_output_folder(args.output, what="the images and their manifest")
    if not getattr(args, "debug", False):  # Lightning's banner and its own Ctrl-C text are not this verb's output
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    prompts = read_prompts(args.prompts) if args.prompts else None
    n = args.n if args.n is not None else (len(prompts) if prompts else None)
    if n is None:
        raise MeddiffError("give -n (the number of images) or --prompts FILE")
    if args.prompt is not None:
        prompts = [args.prompt] * n
    spec = SamplingSpec(scheduler=args.scheduler, steps=args.steps, class_label=args.class_label,
                        guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt,
                        condition_values=args.condition_values)
    if args.adapter_scale is not None and args.adapter is None:
        raise MeddiffError("--adapter-scale weighs an adapter: give --adapter DIR too, or leave it out")
    model = load_model(args.model)
    if args.adapter is not None:
        from meddiff.adapters import apply_adapter

        apply_adapter(model, args.adapter, 1.0 if args.adapter_scale is None else args.adapter_scale)
    labels, condition = None, None
    if args.condition is not None:
        from meddiff.files import file_sha256
        from meddiff.io import load_image

        labels = load_image(args.condition)
        # the file name, not its folder (a path may name a patient); the hash identifies the map
        condition = {"condition": Path(args.condition).name, "condition_sha256": file_sha256(args.condition)}
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    manifest, made = generate_to_folder(model, str(args.model), spec, n, args.output, seed=args.seed,
                                        batch_size=args.batch_size, fmt=args.format, accelerator=args.accelerator,
                                        devices=devices, prompts=prompts, labels=labels, condition=condition)
    if rank_zero_only.rank == 0:  # with several devices every rank returns here
        print(f"wrote {made} new images to {args.output} ({n - made} already there); manifest {manifest}")


def read_prompts(path: str) -> list[str]:
    """Prompts from a JSON-lines file: each line an object with a "prompt" (or "report") string."""
    import json

    prompts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MeddiffError(f"cannot read {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            text = item.get("prompt", item.get("report"))
        except (json.JSONDecodeError, AttributeError):
            text = None
        if not isinstance(text, str):
            raise MeddiffError(f'{path} line {number}: expected {{"prompt": "..."}}')
        prompts.append(text)
    if not prompts:
        raise MeddiffError(f"{path} holds no prompts")
    return prompts
