"""``meddiff export-bundle MODEL OUT``: a meddiff model folder (or bundled model) as a MONAI bundle that
``python -m monai.bundle run --config_file configs/inference.json`` samples (``meddiff.hub.bundle_writer``)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export-bundle", help="write a model as a MONAI bundle (monai.bundle run samples it)")
    p.add_argument("model", metavar="MODEL", help="a model folder or a bundled model's name")
    p.add_argument("output", metavar="OUT", help="the bundle folder to write")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps the bundle samples with (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="the bundle's default seed (monai.bundle run --seed S)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    from meddiff.hub.bundle_writer import write_bundle
    from meddiff.model import BUNDLED_MODELS, load_model
    from meddiff.outputs import check_not_source

    model = load_model(args.model)
    folder = model.folder or BUNDLED_MODELS / args.model
    check_not_source(args.output, {"the model": folder})
    out = write_bundle(model, folder, args.output, steps=args.steps, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {out} (run it: cd {out} && python -m monai.bundle run --config_file configs/inference.json)")
