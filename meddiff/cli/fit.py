"""``meddiff fit --config configs/X.yaml [--any.field=value ...] [--ckpt_path last]``: LightningCLI.

Model and data are chosen by ``class_path`` in the YAML, so every field can be overridden on the
command line. Weights & Biases runs are offline unless the user has logged in; checkpoints are
resumed with ``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import netrc
import os
import warnings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="train a model from a LightningCLI YAML config (meddiff fit --help)", add_help=False)
    p.set_defaults(func=run, passthrough=True)


def wandb_logged_in() -> bool:
    """True if the user gave wandb an API key (environment or ~/.netrc), as ``wandb login`` does."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def run(args) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    if not wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
    cli_args = ["fit", *args.extra]
    if not any(a.startswith("--weights_only") for a in cli_args):
        cli_args.append("--weights_only=true")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=cli_args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": [
                {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "meddiff", "save_dir": "runs"}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            ],
        },
    )
