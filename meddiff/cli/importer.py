"""``meddiff import SOURCE OUT``: a published model (a MONAI model-zoo bundle, MAISI's bundle, a diffusers pipeline
folder) -> a meddiff model folder with its card (``meddiff.hub``). Configs are read as data and weights as tensors:
nothing in SOURCE runs."""

from __future__ import annotations

from meddiff.cli.export import DTYPES


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import", help="turn a published model (MONAI model-zoo bundle, MAISI, diffusers "
                                             "pipeline folder) into a meddiff model folder")
    p.add_argument("source", metavar="SOURCE", help="a MONAI bundle folder as downloaded (configs/inference.json, "
                                                    "models/*.pt) or a diffusers pipeline folder (model_index.json)")
    p.add_argument("output", metavar="OUT", help="the meddiff model folder to write")
    p.add_argument("--text-encoder", metavar="FOLDER", help="for a bundle that encodes prompts with a Hugging Face "
                   "CLIP text model (the CXR generator): a folder with that model's text_encoder/ and tokenizer/")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the stored weights' type")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args) -> None:
    import torch

    from meddiff.hub.imported import read_published
    from meddiff.outputs import check_not_source

    check_not_source(args.output, {"the source": args.source})
    imported = read_published(args.source, text_encoder=args.text_encoder)
    out = imported.save(args.output, overwrite=args.overwrite, dtype=getattr(torch, args.dtype))
    print(f"wrote {out} ({imported.kind} {imported.name}; sample as published: --scheduler "
          f"{imported.sampling['scheduler']} --steps {imported.sampling['steps']}; licence: {imported.licence})")
