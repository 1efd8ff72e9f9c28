"""``meddiff fit --config configs/X.yaml [--any.field=value ...] [--ckpt_path last]``: LightningCLI.

Model and data are chosen by ``class_path`` in the YAML, so every field can be overridden on the
command line. Weights & Biases runs are offline unless the user has logged in; checkpoints are
resumed with ``weights_only=True`` (no arbitrary unpickling).

Check first, then create: the config files, the checkpoint to resume and the data (manifest, image
files, finite voxels) are checked before the Trainer starts its loggers, so a bad input ends in one
``error:`` line with no run folder, wandb run or saved config left behind.
"""

from __future__ import annotations

import netrc
import os
import re
import shlex
import warnings
import zipfile
from pathlib import Path

import yaml

from meddiff.errors import MeddiffError

CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # Lightning resolves these itself


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="train a model from a LightningCLI YAML config (meddiff fit --help)",
                              add_help=False)
    p.set_defaults(func=run, passthrough=True)


def wandb_logged_in() -> bool:
    """True if the user gave wandb an API key (environment or ~/.netrc), as ``wandb login`` does."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def config_files(argv: list[str]) -> list[Path]:
    """The files given with ``--config X``, ``--config=X``, ``-c X`` (in order)."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(Path(argv[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def check_config_files(files: list[Path]) -> None:
    """Each config file exists and is a YAML mapping; otherwise one line naming the file and the place."""
    for path in files:
        if not path.is_file():
            raise MeddiffError(f"config file {path} does not exist — give a LightningCLI YAML such as "
                               "configs/smoke/ddpm_2d.yaml")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or "cannot be parsed"
            raise MeddiffError(f"config file {path} is not valid YAML{where}: {problem} — fix the file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MeddiffError(f"cannot read config file {path}: {exc} — give a LightningCLI YAML file") from None
        if config is not None and not isinstance(config, dict):
            raise MeddiffError(f"config file {path} holds a {type(config).__name__}, "
                               "not a mapping of trainer/model/data — fix the file")


def check_checkpoint(path: str | os.PathLike) -> None:
    """A checkpoint to resume from exists and loads with ``weights_only=True`` (tensors and plain values only).

    A file holding any other object is refused before Lightning (or LightningCLI, which reads its
    hyperparameters) opens it; zip checkpoints are memory-mapped, so the check does not read the weights.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise MeddiffError(f"checkpoint {path} does not exist — give a .ckpt file that meddiff fit wrote, "
                           "or --ckpt_path last")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then refuses
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, AttributeError, TypeError) as exc:
        reason = ("it holds objects other than tensors and plain values" if isinstance(exc, pickle.UnpicklingError)
                  else f"{type(exc).__name__}")
        raise MeddiffError(f"refusing checkpoint {path}: {reason} (read with torch.load weights_only) "
                           "— resume only from a .ckpt that meddiff fit wrote") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise MeddiffError(f"{path} is not a Lightning checkpoint (no state_dict) "
                           "— resume only from a .ckpt that meddiff fit wrote")


def make_manifest_hint(manifest: Path, configs: list[Path]) -> str:
    """The command that writes ``manifest``, as the config's comments give it (``meddiff manifest ... -o DIR``)."""
    wanted = {os.path.normpath(manifest), os.path.normpath(manifest.parent)}
    for config in configs:
        try:
            lines = config.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            match = re.match(r"\s*#(?:\s*First:)?\s*(meddiff manifest .*)", line)
            if not match:
                continue
            command = match.group(1).split("  #")[0].strip()
            try:
                words = shlex.split(command)
            except ValueError:
                continue
            outputs = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-o", "--output")]
            if any(os.path.normpath(out) in wanted for out in outputs):
                return f"make it with `{command}`"
    return ("write one with `meddiff manifest build DIR -o FILE.jsonl` (see data_manifests/README.md) "
            "and set --data.init_args.manifest")


def check_model_folders(config, configs: list[Path]) -> None:
    """A text encoder, an autoencoder or a ControlNet's base model given as a plain folder exists; if a config in
    the same tree writes it (``export_dir``, as configs/clip_findings.yaml and the stage configs do), the error
    names that config."""
    get = config.get if hasattr(config, "get") else (lambda key: None)
    for key, what, remedy in (
            ("text_encoder", "text encoder", "give an exported meddiff CLIP folder, hf:NAME_OR_PATH or local-dir:PATH"),
            ("autoencoder", "autoencoder", "give a folder an AutoencoderModule wrote (export_dir or meddiff export)"),
            ("base", "base model", "give a model folder (meddiff export or a DiffusionModule's export_dir)")):
        spec = get(f"model.init_args.{key}")
        if not isinstance(spec, str) or re.match(r"^[a-z-]+:", spec) or Path(spec).exists():
            continue
        for folder in dict.fromkeys(parent for config_file in configs
                                    for parent in (config_file.parent, config_file.parent.parent)):
            for candidate in sorted(folder.glob("*.yaml")):
                if re.search(rf"^\s*export_dir:\s*['\"]?{re.escape(spec)}['\"]?\s*$",
                             candidate.read_text(errors="replace"), re.MULTILINE):
                    raise MeddiffError(f"{what} folder {spec} does not exist — "
                                       f"make it with `meddiff fit --config {candidate}`")
        raise MeddiffError(f"{what} folder {spec} does not exist — {remedy}")


def check_data(datamodule, configs: list[Path]) -> None:
    """Read the manifest, check its files and load the training data (finite voxels) before any logger starts."""
    from meddiff.data.datamodule import ManifestDataModule

    if not isinstance(datamodule, ManifestDataModule):
        return
    manifest = datamodule.manifest_path
    if not manifest.exists():
        raise MeddiffError(f"manifest {manifest} does not exist — {make_manifest_hint(manifest, configs)}")
    datamodule.setup("fit")


def check_resume(trainer, ckpt_path: str | None) -> None:
    """The checkpoint ``fit`` will resume from (``last`` resolved as Lightning does) is safe to read."""
    if ckpt_path is None or str(ckpt_path) in CKPT_KEYWORDS[1:] or str(ckpt_path).startswith("registry:"):
        return
    if ckpt_path == "last":
        from lightning.pytorch.trainer.states import TrainerFn

        try:
            with warnings.catch_warnings():  # Lightning warns (once, later) when there is no last checkpoint
                warnings.simplefilter("ignore")
                ckpt_path = trainer._checkpoint_connector._parse_ckpt_path(TrainerFn.FITTING, "last",
                                                                           model_provided=True, model_connected=False)
        except Exception:  # noqa: BLE001
            # a private Lightning call: if it changes, Lightning's own weights_only load still guards
            return
        if ckpt_path is None:
            return
    check_checkpoint(ckpt_path)


def run(args) -> None:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    cli_args = ["fit", *args.extra]
    configs = config_files(cli_args)
    check_config_files(configs)
    weights_only = [a for a in cli_args if a.startswith("--weights_only")]
    if any(a not in ("--weights_only=true", "--weights_only=True") for a in weights_only):
        raise MeddiffError("meddiff fit always reads checkpoints with weights_only=true (no code from a file) "
                           "— drop --weights_only")
    if not weights_only:
        cli_args.append("--weights_only=true")

    class MeddiffCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            ckpt_path = self.config.get("fit", {}).get("ckpt_path")
            if (ckpt_path is not None and str(ckpt_path) not in CKPT_KEYWORDS
                    and not str(ckpt_path).startswith("registry:")):
                check_checkpoint(ckpt_path)  # before LightningCLI reads the checkpoint's hyperparameters

        def before_instantiate_classes(self) -> None:
            check_model_folders(self.config["fit"], configs)  # before the model loads them

        def before_fit(self) -> None:
            check_data(self.datamodule, configs)
            check_resume(self.trainer, self.config["fit"].get("ckpt_path"))

    if not wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    try:
        MeddiffCLI(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=cli_args,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "fit": {"exit_on_error": False}},
            trainer_defaults={
                "logger": [
                    {"class_path": "lightning.pytorch.loggers.WandbLogger",
                     "init_args": {"project": "meddiff", "save_dir": "runs"}},
                    {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
                ],
            },
        )
    except ArgumentError as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())
        raise MeddiffError(f"{message} — see 'meddiff fit --help'") from None
