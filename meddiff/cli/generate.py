"""``meddiff generate --model DIR -n N -o OUTDIR``: synthetic images plus a provenance manifest.

torch and Lightning load inside ``run``, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

from meddiff.io import SYNTHETIC_FORMATS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate synthetic images and a manifest (resumable)")
    p.add_argument("--model", required=True, help="model folder (meddiff export output)")
    p.add_argument("-n", type=int, required=True, help="number of images")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", help="ddpm, ddim, dpm++2m, euler, unipc, pndm")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--format", choices=SYNTHETIC_FORMATS, default="nii.gz")
    p.add_argument("--class-label", type=int, help="class for class-conditioned models")
    p.add_argument("--accelerator", default="auto", help="cpu, gpu, auto")
    p.add_argument("--devices", default="1", help="number of devices; >1 runs one process per device (DDP), each writing a shard")
    p.set_defaults(func=run)


def run(args) -> None:
    from lightning.pytorch.utilities import rank_zero_only

    from meddiff.generation import generate_to_folder
    from meddiff.pipeline import load_pipeline

    pipeline = load_pipeline(args.model)
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    manifest, made = generate_to_folder(
        pipeline,
        model_id=str(args.model),
        n=args.n,
        out_dir=args.output,
        steps=args.steps,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        fmt=args.format,
        class_label=args.class_label,
        accelerator=args.accelerator,
        devices=devices,
    )
    if rank_zero_only.rank == 0:  # with several devices every rank returns here
        print(f"wrote {made} new images to {args.output} ({args.n - made} already there); manifest {manifest}")
