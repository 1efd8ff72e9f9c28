"""``meddiff export CKPT DIR``: a Lightning checkpoint -> a model folder (a diffusion model's EMA weights, a base
model with its ControlNet, or an autoencoder's first-stage folder) or an adapter folder (a LoRA or textual-inversion
run's); a MONAI bundle folder (MAISI's or another model-zoo generator) -> a meddiff model folder, as ``meddiff
import`` writes it. ``meddiff export BASE DIR --merge ADAPTER``: the model BASE (a folder or a bundled model's name)
with a LoRA adapter trained on it baked into its weights, as a full model folder.

torch and Lightning load inside the functions, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from meddiff.errors import MeddiffError, first_line

DTYPES = {"float32", "float16", "bfloat16"}  # torch dtypes by name; torch loads inside run


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="turn a training checkpoint into a model folder (config.json + safetensors)"
    )
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint meddiff fit wrote, a meddiff model folder (to "
                   "store it again, e.g. in float16), or a MONAI bundle folder (as meddiff import)")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="the stored weights' type: float16 halves the folder (the networks compute in float32 "
                        "after loading; how the bundled models are shipped)")
    p.add_argument("--merge", metavar="ADAPTER", help="bake this LoRA adapter folder into the model CKPT names (a "
                   "model folder or a bundled model's name; the base the adapter was trained on) and write the merged "
                   "model folder")
    p.add_argument("--overwrite", action="store_true")
    # save_pretrained writes the folder's files one by one: an interrupted export may leave some of them
    p.set_defaults(func=run, resume_hint="the output folder may hold part of the model; run the command again "
                                         "with --overwrite")


def module_from_checkpoint(path: str | Path):
    """Rebuild the training module (``DiffusionModule``, or the ``AutoencoderModule`` its checkpoint names) from a
    checkpoint, read with torch's weights-only unpickler (nothing in it runs). The flat hyperparameters of older
    checkpoints go through ``meddiff.training.migrate.nested_arguments``."""
    from meddiff.training import (
        AutoencoderModule,
        ControlNetModule,
        DiffusionModule,
        LoRAModule,
        TextualInversionModule,
    )
    from meddiff.training.migrate import nested_arguments
    from meddiff.weights import check_fit, torch_load

    checkpoint = torch_load(path, "checkpoint")
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("state_dict"), dict)
        or not isinstance(checkpoint.get("hyper_parameters", {}), dict)
    ):
        raise MeddiffError(f"{path} is not a Lightning checkpoint (no state_dict) "
                           "— give a .ckpt that meddiff fit wrote")
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not str(k).startswith("_")}
    kinds = {"autoencoder": AutoencoderModule, "controlnet": ControlNetModule, "lora": LoRAModule,
             "textual_inversion": TextualInversionModule}
    kind = checkpoint.get("meddiff_module") if checkpoint.get("meddiff_module") in kinds else "diffusion"
    cls = kinds.get(kind, DiffusionModule)
    try:
        # checkpoints of older meddiff hold flat arguments (adapters came later: theirs are nested)
        module = cls(**(nested_arguments(hparams, kind) if kind in ("diffusion", "autoencoder") else hparams))
    except (TypeError, ValueError, KeyError, RuntimeError, AssertionError) as exc:
        raise MeddiffError(f"{path} is not a {cls.__name__} checkpoint: {first_line(exc)} "
                           "— give a .ckpt that meddiff fit wrote") from None
    state = checkpoint["state_dict"]
    check_fit(module, state, f"{path}: the weights do not fit the checkpoint's own hyper_parameters",
              "give a .ckpt that meddiff fit wrote, unedited")
    module.load_state_dict(state)
    return module


def run(args) -> None:
    import torch

    from meddiff.hub.bundle import bundle_config_path
    from meddiff.hub.imported import read_published
    from meddiff.model import CONFIG_NAME, load_model
    from meddiff.outputs import check_not_source
    from meddiff.training import AutoencoderModule
    from meddiff.training.adapters import AdapterModule

    check_not_source(args.output, {"the input": args.checkpoint, **({"the adapter": args.merge} if args.merge else {})})
    dtype = getattr(torch, args.dtype)
    if args.merge is not None:
        from meddiff.adapters import merge_adapter

        model = merge_adapter(load_model(args.checkpoint), args.merge)
        for network in model.networks.values():
            network.to(dtype)
        out = model.save_pretrained(args.output, overwrite=args.overwrite)
        print(f"wrote {out} ({args.checkpoint} with the adapter {args.merge} merged, {args.dtype})")
        return
    if bundle_config_path(args.checkpoint) is not None:  # a MONAI bundle folder: meddiff import
        imported = read_published(args.checkpoint)
        out = imported.save(args.output, overwrite=args.overwrite, dtype=dtype)
        print(f"wrote {out} ({imported.kind} {imported.name}, {args.dtype}; licence: {imported.licence})")
        return
    if (Path(args.checkpoint) / CONFIG_NAME).is_file():
        model, what = load_model(args.checkpoint), f"the model folder {args.checkpoint}"
    else:
        module = module_from_checkpoint(args.checkpoint)
        if isinstance(module, AdapterModule):
            if dtype != torch.float32:
                raise MeddiffError("--dtype applies to model folders; an adapter is stored in float32 (it is small)")
            module.save_adapter(args.output, ema=not args.no_ema, overwrite=args.overwrite)
            return
        if isinstance(module, AutoencoderModule):
            if dtype != torch.float32:
                raise MeddiffError("--dtype applies to diffusion model folders; an autoencoder stage is exported "
                                   "in float32 — export the latent model trained on it in float16")
            out = module.save_pretrained(args.output, overwrite=args.overwrite)
            print(f"wrote {out} (an autoencoder: train a latent model on it with DiffusionModule autoencoder: {out})")
            return
        model, what = module.diffusion_model(ema=not args.no_ema), f"{'EMA' if not args.no_ema else 'raw'} weights"
    for network in model.networks.values():
        network.to(dtype)
    out = model.save_pretrained(args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({what}, {args.dtype})")
