"""``meddiff export CKPT DIR``: a Lightning checkpoint -> a pipeline folder with the EMA weights.

torch and Lightning load inside the functions, so ``meddiff --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

from meddiff.errors import MeddiffError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="turn a training checkpoint into a model folder (config.json + safetensors)")
    p.add_argument("checkpoint", metavar="CKPT")
    p.add_argument("output", metavar="DIR")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA weights")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def module_from_checkpoint(path: str | Path):
    """Rebuild the DiffusionModule from a checkpoint, read with ``weights_only=True`` (nothing unpickled)."""
    import torch

    from meddiff.training import DiffusionModule

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MeddiffError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        raise MeddiffError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    try:
        module = DiffusionModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, RuntimeError) as exc:
        raise MeddiffError(f"{path} is not a DiffusionModule checkpoint: {str(exc).splitlines()[0]}") from None
    return module


def run(args) -> None:
    module = module_from_checkpoint(args.checkpoint)
    out = module.pipeline(ema=not args.no_ema).save_pretrained(args.output, overwrite=args.overwrite)
    print(f"wrote {out} ({'EMA' if not args.no_ema else 'raw'} weights)")
