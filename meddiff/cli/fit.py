"""``meddiff fit --config configs/X.yaml [--any.field=value ...] [--ckpt_path last]``: LightningCLI.

Model and data are chosen by ``class_path`` in the YAML, so every field can be overridden on the
command line. Weights & Biases runs are offline unless the user has logged in; checkpoints are
resumed with ``weights_only=True`` (no arbitrary unpickling).

Check first, then create: the config files, the trainer's limits (``check_trainer``), the checkpoint to
resume (and that its weights fit the model) and the data (manifest, image files, finite voxels) are checked
before the Trainer starts its loggers, so a bad input ends in one ``error:`` line with no run folder, wandb
run or saved config left behind, and without Lightning's banner (``HeldLogs``: its log lines are shown
once the checks have passed). A config value jsonargparse refuses is one line naming its key
(``config_error_line``). Ctrl-C or SIGTERM ends with exit 130 and a line saying how to resume.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import re
import shlex
import signal
import threading
import warnings
import zipfile
from pathlib import Path

import yaml

from meddiff.errors import MeddiffError, first_line

CKPT_KEYWORDS = ("last", "best", "hpc", "registry")  # Lightning resolves these itself


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("fit", help="train a model from a LightningCLI YAML config (meddiff fit --help)",
                              add_help=False)
    # what Ctrl-C or SIGTERM leaves (meddiff.cli.main.run prints it after "interrupted — "); refined once training
    # started (interrupted_hint)
    p.set_defaults(func=run, passthrough=True,
                   resume_hint="run the same command again (with --ckpt_path last it resumes from the last "
                               "checkpoint saved, if any)")


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
        check_flat_arguments(path, (config or {}).get("model"))


MODULE_KINDS = {"DiffusionModule": "diffusion", "AutoencoderModule": "autoencoder"}


def check_flat_arguments(path: Path, model) -> None:
    """An old flat argument of ``DiffusionModule``/``AutoencoderModule`` (``channels``, ``image_shape``, ...) is
    refused with one line naming its nested key (``meddiff.training.migrate``)."""
    from meddiff.training.migrate import is_flat, moved_key

    if not isinstance(model, dict) or not isinstance(model.get("init_args"), dict):
        return
    kind = MODULE_KINDS.get(str(model.get("class_path", "")).rsplit(".", 1)[-1])
    arguments = model["init_args"]
    if kind is None or not is_flat(arguments, kind):
        return
    old = [key for key, value in arguments.items() if is_flat({key: value}, kind)]
    raise MeddiffError(f"config file {path}: model.init_args.{old[0]} is now model.init_args.{moved_key(old[0], kind)}"
                       f" ({len(old)} flat key{'s' if len(old) > 1 else ''} of an older meddiff: "
                       f"{', '.join(old)}) — nest them as in configs/ (meddiff.training.migrate.nested_arguments)")


def check_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint to resume from exists and loads with ``weights_only=True`` (tensors and plain values only).

    A file holding any other object is refused before Lightning (or LightningCLI, which reads its
    hyperparameters) opens it; zip checkpoints are memory-mapped, so the check does not read the weights.
    Returns the checkpoint (its tensors memory-mapped).
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
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise MeddiffError(f"{path} is not a Lightning checkpoint (no state_dict) "
                           "— resume only from a .ckpt that meddiff fit wrote")
    return checkpoint


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
    """A text encoder, an autoencoder or the base model of a ControlNet or an adapter (a folder, or a bundled model's
    name) given as a plain folder exists; if a config in the same tree writes it (``export_dir``, as
    configs/clip_findings.yaml and the stage configs do), the error names that config."""
    from meddiff.model import bundled_models

    get = config.get if hasattr(config, "get") else (lambda key: None)
    for key, what, remedy in (
            ("conditioning.text_encoder", "text encoder",
             "give an exported meddiff CLIP folder, hf:NAME_OR_PATH or local-dir:PATH"),
            ("autoencoder", "autoencoder", "give a folder an AutoencoderModule wrote (export_dir or meddiff export)"),
            ("base", "base model", "give a model folder (meddiff export or a DiffusionModule's export_dir) or a "
                                    "bundled model's name")):
        spec = get(f"model.init_args.{key}")
        if not isinstance(spec, str) or re.match(r"^[a-z-]+:", spec) or Path(spec).exists() or \
                (key == "base" and spec in bundled_models()):
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
    """Read the manifest, check its files and load the training data (finite voxels) before any logger starts;
    prepare the bundled recipes' training arrays (``meddiff.data.arrays``) the same way."""
    from meddiff.data.arrays import SliceArrayDataModule
    from meddiff.data.datamodule import ManifestDataModule

    if isinstance(datamodule, SliceArrayDataModule):
        datamodule.setup("fit")
    if not isinstance(datamodule, ManifestDataModule):
        return
    manifest = datamodule.manifest_path
    if not manifest.exists():
        raise MeddiffError(f"manifest {manifest} does not exist — {make_manifest_hint(manifest, configs)}")
    datamodule.setup("fit")


def check_resume(trainer, ckpt_path: str | None, model=None, read: dict | None = None) -> None:
    """The checkpoint ``fit`` will resume from (``last`` resolved as Lightning does) is safe to read, and its
    weights fit ``model`` (when the model loads strictly, as meddiff's modules do): otherwise one line naming
    the tensors that differ, not torch's ``Error(s) in loading state_dict`` after the run folder exists.
    ``read``: checkpoints already read and checked, by path (not read again)."""
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
    checkpoint = (read or {}).get(str(ckpt_path)) or check_checkpoint(ckpt_path)
    if model is not None and getattr(model, "strict_loading", True):
        from meddiff.weights import check_fit

        check_fit(model, checkpoint["state_dict"], f"checkpoint {ckpt_path} does not fit this config's model",
                  "resume with the config the checkpoint was trained with, or leave out --ckpt_path to start anew")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _share(value) -> bool:
    """A whole number of batches (0 or more) or a fraction 0.0 .. 1.0 of them."""
    return (_whole(value) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


# trainer key: (accepted?, what it must be). Lightning refuses some of these only once the run folder, loggers and
# wandb run exist (max_steps -5), some never (log_every_n_steps 0 divides by zero mid-run).
TRAINER_LIMITS = {
    "max_steps": (lambda v: _whole(v) and (v == -1 or v >= 1), "-1 (no limit) or a whole number, 1 or more"),
    "max_epochs": (lambda v: v is None or _whole(v) and (v == -1 or v >= 1),
                   "-1 (no limit), a whole number 1 or more, or null"),
    "min_steps": (lambda v: v is None or _whole(v) and v >= 0, "a whole number, 0 or more, or null"),
    "min_epochs": (lambda v: v is None or _whole(v) and v >= 0, "a whole number, 0 or more, or null"),
    "check_val_every_n_epoch": (lambda v: v is None or _whole(v) and v >= 1, "a whole number, 1 or more, or null"),
    "log_every_n_steps": (lambda v: v is None or _whole(v) and v >= 1, "a whole number, 1 or more, or null"),
    "accumulate_grad_batches": (lambda v: _whole(v) and v >= 1, "a whole number, 1 or more"),
    "num_sanity_val_steps": (lambda v: v is None or _whole(v) and v >= -1, "-1 (all), 0 or more, or null"),
    "num_nodes": (lambda v: _whole(v) and v >= 1, "a whole number, 1 or more"),
    "overfit_batches": (_share, "a number of batches (0 or more) or a fraction from 0.0 to 1.0"),
    **{f"limit_{stage}_batches": (lambda v: v is None or _share(v),
                                  "a number of batches (0 or more), a fraction from 0.0 to 1.0, or null")
       for stage in ("train", "val", "test", "predict")},
    "val_check_interval": (lambda v: v is None or (_whole(v) and v >= 1) or (isinstance(v, float) and 0.0 < v <= 1.0)
                           or not isinstance(v, (int, float)),  # a time (str, dict, timedelta): Lightning's to check
                           "a number of batches (1 or more), a fraction above 0.0 up to 1.0, a time, or null"),
    "gradient_clip_val": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) and v >= 0), "a number, 0 or more, or null"),
}

# Lightning's defaults of the keys that have no null (a trainer section jsonargparse did not fill)
TRAINER_DEFAULTS = {"max_steps": -1, "accumulate_grad_batches": 1, "num_nodes": 1, "overfit_batches": 0.0}


def check_trainer(trainer) -> None:
    """The trainer's step, epoch and batch limits (``TRAINER_LIMITS``), from the config or the command line, before
    any logger, run folder or wandb run exists."""
    get = trainer.get if hasattr(trainer, "get") else (lambda key, default=None: default)
    for key, (accepted, what) in TRAINER_LIMITS.items():
        value = get(key, TRAINER_DEFAULTS.get(key))
        if not accepted(value):
            raise MeddiffError(f"trainer.{key} must be {what}, not {value!r} "
                               f"— fix it in the config or with --trainer.{key}=VALUE")


KEY = re.compile(r'Parser key "([^"]+)":?')
CLASS_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':?")
UNION = "Does not validate against any of the Union subtypes"


def config_error_line(text: str) -> str:
    """jsonargparse's refusal of a config value as one line: the full key (``model.init_args.lr``), what was given
    and what is accepted, then what to do. Its own text puts the key on one line and the reason, nested under the
    union of types and the ``class_path`` tried, on the lines below it."""
    lines = [line.strip().lstrip("- ").strip() for line in text.splitlines() if line.strip()]
    keys: list[str] = []
    cls = pending = None  # the class_path tried; ``pending``: tried, but no key of its own named yet
    for i, line in enumerate(lines):
        key = KEY.fullmatch(line)
        if key:
            keys.append(("init_args." if pending else "") + key.group(1))
            pending = None
            continue
        if not keys:
            break  # not a key's refusal (an unknown argument, a missing file, ...)
        problem = CLASS_PROBLEM.fullmatch(line)
        if problem:
            cls = pending = problem.group(1)
            continue
        rest = lines[i:]
        if pending is None and any(CLASS_PROBLEM.fullmatch(x) for x in rest):
            continue  # the class's own argument is what failed: follow it
        if pending is None and any(x.startswith(UNION) for x in rest):
            expected = [_type_name(m.group(1)) for m in (re.fullmatch(r"Expected an? ([^:]+)", x) for x in rest)
                        if m and not m.group(1).startswith("path")]
            given = next((x.split(":", 1)[1].strip() for x in rest if x.startswith("Given value:")), "?")
            return _config_line(keys, f"{given!r} is not accepted (expected {' or '.join(expected) or 'another'})")
        option = re.fullmatch(r"Option '([^']+)' is not accepted", line)
        if option:
            from meddiff.training.migrate import moved_key

            kind = MODULE_KINDS.get(str(cls).rsplit(".", 1)[-1])
            moved = moved_key(option.group(1), kind) if kind else None
            if moved:
                return _config_line([*keys, f"init_args.{moved}"], f"{option.group(1)} of an older meddiff is now "
                                    f"{moved}: give it there")
            return _config_line([*keys, f"init_args.{option.group(1)}"], f"{cls} has no such argument")
        required = re.match(r'Key "([^"]+)" is required|the following arguments are required: ([\w.]+)', line)
        if required:
            name = required.group(1) or required.group(2)
            return _config_line([*keys, f"init_args.{name}" if pending else name], "required, and not given")
        got = re.fullmatch(r"Expected an? (.+?)\. Got value: (.*)", line)
        if got:
            return _config_line(keys, f"{got.group(2)!r} is not accepted (expected {_type_name(got.group(1))})")
        if pending:
            return _config_line([*keys, "class_path"], f"cannot use {pending}: {line}")
        return _config_line(keys, line)
    return " ".join(lines[:2]) + " — see 'meddiff fit --help'"


def _type_name(text: str) -> str:
    """``<class 'int'>`` -> ``int``; ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``; NoneType -> null."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("NoneType", "null")
    return re.sub(r"typing\.Literal\[(.*)\]", r"one of \1", text)


def _config_line(keys: list[str], what: str) -> str:
    key = ".".join(keys)
    return f"config key {key}: {what} — fix it in the config or with --{key}=VALUE (see 'meddiff fit --help')"


class HeldLogs:
    """Lightning's log lines (its GPU/TPU banner, seeding, tips), held back while the run is checked: shown
    when ``release`` says the checks passed, dropped when ``close`` comes first, so a refused run prints its
    error line alone. Every top logger of Lightning is given one holding handler and stops propagating; records
    keep their logger, so released ones go where they would have gone."""

    NAMES = ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning")

    def __init__(self):
        self.records: list[logging.LogRecord] = []
        self.holder = logging.Handler()
        self.holder.emit = self.records.append
        self.saved = {}
        for name in self.NAMES:
            logger = logging.getLogger(name)
            self.saved[name] = (logger.handlers[:], logger.propagate)
            logger.handlers[:] = [self.holder]
            logger.propagate = False

    def close(self) -> None:
        """Put every logger back as it was (held records not released are dropped)."""
        for name, (handlers, propagate) in self.saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.propagate = propagate
        self.saved = {}

    def release(self) -> None:
        """Put the loggers back and show what was held."""
        self.close()
        records, self.records[:] = self.records[:], []
        for record in records:
            logging.getLogger(record.name).handle(record)


def finish_wandb(exit_code: int) -> None:
    """End this process's wandb run, if one started (wandb prints where its data is as it finishes)."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=exit_code)
        except Exception:  # noqa: BLE001 - the run's data is on disk already; at exit wandb tries again
            pass


def interrupted_hint(trainer, cli_args: list[str]) -> str:
    """What a user does after Ctrl-C or SIGTERM stopped training: resume from the last checkpoint, if one was
    written (``ModelCheckpoint(save_last=True)``, which ``--ckpt_path last`` finds), else start over."""
    callbacks = getattr(trainer, "checkpoint_callbacks", [])
    last = next((cb.last_model_path for cb in callbacks if getattr(cb, "last_model_path", "")
                 and Path(cb.last_model_path).is_file()), None)
    resuming = "--ckpt_path=last" in cli_args or ("--ckpt_path", "last") in zip(cli_args, cli_args[1:], strict=False)
    if last:
        how = "run the same command again" if resuming else "run the same command with --ckpt_path last"
        return f"the last checkpoint is {last}: {how} to resume from it"
    saved = next((cb.best_model_path for cb in callbacks if getattr(cb, "best_model_path", "")
                  and Path(cb.best_model_path).is_file()), None)
    if saved:
        return f"a checkpoint was saved ({saved}): run the same command with --ckpt_path {saved} to resume from it"
    return "no checkpoint was saved yet: run the same command again to start over"


def run(args) -> None:
    import lightning.pytorch as pl
    from jsonargparse import ArgumentError
    from lightning.pytorch.cli import LightningCLI

    from meddiff.cli.bounds import check_seed

    cli_args = ["fit", *args.extra]
    configs = config_files(cli_args)
    check_config_files(configs)
    weights_only = [a for a in cli_args if a.startswith("--weights_only")]
    if any(a not in ("--weights_only=true", "--weights_only=True") for a in weights_only):
        raise MeddiffError("meddiff fit always reads checkpoints with weights_only=true (no code from a file) "
                           "— drop --weights_only")
    if not weights_only:
        cli_args.append("--weights_only=true")
    held = HeldLogs() if not getattr(args, "debug", False) else None
    started: dict = {}
    read: dict[str, dict] = {}  # the checkpoint to resume from, read once (memory-mapped) and checked

    class MeddiffCLI(LightningCLI):
        def parse_arguments(self, parser, args) -> None:
            super().parse_arguments(parser, args)
            check_trainer(self.config.get("fit", {}).get("trainer"))
            seed = self.config.get("fit", {}).get("seed_everything")
            if _whole(seed):  # true/false: Lightning picks one / seeds nothing
                check_seed(seed, "--seed_everything")
            ckpt_path = self.config.get("fit", {}).get("ckpt_path")
            if (ckpt_path is not None and str(ckpt_path) not in CKPT_KEYWORDS
                    and not str(ckpt_path).startswith("registry:")):
                read[str(ckpt_path)] = check_checkpoint(ckpt_path)  # before LightningCLI reads its hyperparameters

        def _parse_ckpt_path(self) -> None:
            """Lightning's own (a checkpoint to resume updates the model's config with its hyperparameters), on the
            checkpoint ``parse_arguments`` read, with the flat hyperparameters of an older meddiff's checkpoint
            nested first (``meddiff.training.migrate``)."""
            from meddiff.training.migrate import nested_arguments

            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if str(ckpt_path) not in read:
                return
            hparams = dict(read[str(ckpt_path)].get("hyper_parameters", {}))
            hparams.pop("_instantiator", None)
            if not hparams:
                return
            kind = MODULE_KINDS.get(str(hparams.get("_class_path", "")).rsplit(".", 1)[-1])
            if kind is not None:
                hparams = nested_arguments(hparams, kind)
            if "_class_path" in hparams:
                hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

        def before_instantiate_classes(self) -> None:
            check_model_folders(self.config["fit"], configs)  # before the model loads them

        def instantiate_trainer(self, **kwargs):
            from lightning.fabric.utilities.exceptions import MisconfigurationException

            try:
                return super().instantiate_trainer(**kwargs)
            except (MisconfigurationException, ValueError, TypeError) as exc:  # Lightning's refusal of a setting
                raise MeddiffError(f"the trainer settings do not work: {first_line(exc)} "
                                   "— fix them in the config or with --trainer.KEY=VALUE") from None

        def before_fit(self) -> None:
            check_data(self.datamodule, configs)
            check_resume(self.trainer, self.config["fit"].get("ckpt_path"), self.model, read)
            started["trainer"] = self.trainer
            if held is not None:
                held.release()  # checked: the run starts, with Lightning's usual lines

    if not wandb_logged_in():
        os.environ.setdefault("WANDB_MODE", "offline")
    import torch

    # subnormal floats (tiny activations and gradients late in training) are many times slower on CPUs; as zeros
    # they change no result that float32 resolves. A processor-wide state: set back when the fit ends
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    main_thread = threading.current_thread() is threading.main_thread()
    sigint = signal.getsignal(signal.SIGINT) if main_thread else None
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
        raise MeddiffError(config_error_line(str(exc))) from None
    except SystemExit:
        # Lightning turns Ctrl-C (and SIGTERM, which meddiff.cli.main makes one) into sys.exit(1) after its cleanup
        trainer = started.get("trainer")
        if trainer is not None and trainer.interrupted:
            args.resume_hint = interrupted_hint(trainer, cli_args)
            finish_wandb(exit_code=130)  # its "wandb sync ..." lines now, not after the error line at exit
            raise KeyboardInterrupt from None
        raise
    finally:
        torch.set_flush_denormal(False)
        if held is not None:
            held.close()
        if sigint is not None:  # Lightning ignores SIGINT from its cleanup on: put the handler back
            signal.signal(signal.SIGINT, sigint)
