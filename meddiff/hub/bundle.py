"""MONAI model-zoo generative bundles -> a meddiff model: ``mednist_ddpm``,
``brats_mri_axial_slices_generative_diffusion``, ``brats_mri_generative_diffusion``,
``brain_image_synthesis_latent_diffusion_model`` and ``cxr_image_synthesis_latent_diffusion_model`` (MAISI has its
own reader, ``meddiff.hub.maisi``).

A bundle's ``configs/inference.json`` (or ``.yaml``) is read as data, never run: MONAI's ``ConfigParser`` would
evaluate its ``$`` expressions, which are Python code from a downloaded file. The networks and the noise scheduler
are found by their ``_target_`` among the MONAI (and older GenerativeModels) classes meddiff knows; any other
``_target_`` where a network or scheduler is defined is refused. Arguments may use ``@name`` references and ``$``
followed by a plain literal; any other ``$`` code where meddiff needs a value is refused. Defaults that live only
in the bundle's sampler script (the CXR bundle's latent ``scale_factor`` and ``guidance_scale``) are read from
its function signature with ``ast``, never imported. Checkpoints are read weights-only (``meddiff.weights``), in
MONAI's layout or the older GenerativeModels one, which MONAI's own ``load_old_state_dict`` converts.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import yaml

from meddiff.diffusion.schedulers import PREDICTION_OF
from meddiff.errors import MeddiffError, first_line
from meddiff.hub.imported import Imported, licence_file_line

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# The classes meddiff rebuilds, by class name, and the packages a bundle may name them from.
COMPONENT_CLASSES = {"DiffusionModelUNet": "unet", "AutoencoderKL": "autoencoder",
                     "DDPMScheduler": "scheduler", "DDIMScheduler": "scheduler"}
KNOWN_PACKAGES = ("monai.networks.nets", "monai.networks.schedulers", "generative.networks.nets",
                  "generative.networks.schedulers")
# MONAI's scheduler names -> meddiff's (``NoiseSchedule``); its prediction types are diffusers' names
MONAI_BETA_SCHEDULES = {"linear_beta": "linear", "scaled_linear_beta": "scaled_linear", "cosine": "cosine"}
MONAI_PREDICTIONS = PREDICTION_OF
WEIGHTS_SUFFIX = r"\.(?:pt|pth|ckpt)"


def bundle_config_path(bundle: str | Path) -> Path | None:
    """The bundle's inference config, or None when ``bundle`` is not a bundle folder."""
    for name in CONFIG_NAMES:
        path = Path(bundle) / "configs" / name
        if path.is_file():
            return path
    return None


def read_config(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())  # JSON is YAML: one safe reader for both
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise MeddiffError(f"cannot read {path}: {first_line(exc)} — give a MONAI bundle folder") from None
    if not isinstance(config, dict):
        raise MeddiffError(f"{path} is not a MONAI bundle config (no mapping at the top)")
    return config


def literal(text: str, where: str):
    """The value of a ``$`` expression that is a plain literal, possibly a sum of lists (``[1] + [8, 36]``);
    anything else is code, which meddiff never runs."""

    def value(node):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return value(node.left) + value(node.right)
        return ast.literal_eval(node)

    try:
        return value(ast.parse(text.strip(), mode="eval").body)
    except (ValueError, TypeError, SyntaxError, RecursionError):
        raise MeddiffError(f"{where} is code ({text.strip()[:60]!r}), which meddiff never runs "
                           "— give a bundle whose values are plain") from None


class BundleConfig:
    """A bundle's config as data: ``resolve`` follows ``@name`` references and reads ``$`` literals."""

    def __init__(self, path: Path):
        self.path, self.config = path, read_config(path)

    def resolve(self, value, where: str, depth: int = 0):
        if depth > 20:
            raise MeddiffError(f"{self.path}: {where} refers to itself")
        if isinstance(value, str) and re.fullmatch(r"@[\w#:]+", value):
            name = value[1:].replace("::", "#").split("#")[0]
            if name not in self.config:
                raise MeddiffError(f"{self.path}: {where} refers to @{name}, which the config does not define")
            return self.resolve(self.config[name], name, depth + 1)
        if isinstance(value, str) and value.startswith("$"):
            text = re.sub(r"@(\w+)", lambda m: repr(self.resolve("@" + m.group(1), where, depth + 1)), value[1:])
            return literal(text, f"{self.path}: {where}")
        if isinstance(value, dict):
            # _target_, _requires_, _disabled_, _desc_, _mode_: instructions to MONAI's parser, not arguments
            return {k: self.resolve(v, f"{where}.{k}", depth + 1) for k, v in value.items()
                    if not (k.startswith("_") and k.endswith("_"))}
        if isinstance(value, list):
            return [self.resolve(v, where, depth + 1) for v in value]
        return value

    def definitions(self) -> dict[str, tuple[str, dict]]:
        """``{component: (entry name, arguments)}`` for the UNet, the autoencoder and the scheduler; an unknown
        ``_target_`` in an entry that defines a network or a scheduler is refused."""
        found: dict[str, tuple[str, dict]] = {}
        for name, entry in self.config.items():
            if not isinstance(entry, dict) or "_target_" not in entry:
                continue
            target = str(entry["_target_"])
            module, _, cls = target.rpartition(".")
            component = COMPONENT_CLASSES.get(cls)
            known_module = module == "" or module.startswith(KNOWN_PACKAGES)
            if component is None or not known_module:
                if name.endswith("_def") or "scheduler" in name.lower():
                    raise MeddiffError(f"{self.path}: {name} is a {target}, which meddiff does not know — it reads "
                                       f"MONAI's {', '.join(sorted(set(COMPONENT_CLASSES)))}")
                continue  # inferers, savers, loaders: the bundle's own code, never run
            if component in found:
                raise MeddiffError(f"{self.path} defines two {component}s ({found[component][0]} and {name}) "
                                   "— meddiff reads bundles with one generator")
            arguments = self.resolve(entry, name)
            arguments["_class"] = cls
            found[component] = (name, arguments)
        if "unet" not in found or "scheduler" not in found:
            missing = "DiffusionModelUNet" if "unet" not in found else "noise scheduler"
            raise MeddiffError(f"{self.path} defines no {missing} — give a generative MONAI bundle")
        return found

    def weight_files(self) -> list[str]:
        """The checkpoint file names the config's strings mention (``'/models/model.pt'``), in order."""
        names: list[str] = []
        for value in self.strings(self.config):
            for match in re.findall(rf"([\w.-]+{WEIGHTS_SUFFIX})\b", value):
                if match not in names:
                    names.append(match)
        return names

    def strings(self, value):
        """Every string in ``value`` (the whole config), depth first."""
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from self.strings(v)
        elif isinstance(value, list):
            for v in value:
                yield from self.strings(v)


def sampler_defaults(bundle: Path) -> dict[str, float]:
    """Numeric defaults of the bundle's sampling function (``scale_factor``, ``guidance_scale``) read from
    ``scripts/*.py`` with ``ast``: the script is parsed, never imported."""
    found: dict[str, float] = {}
    for script in sorted((bundle / "scripts").glob("*.py")):
        try:
            tree = ast.parse(script.read_text())
        except (OSError, UnicodeDecodeError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and "sampl" in node.name:
                args = node.args.args[len(node.args.args) - len(node.args.defaults):]
                for arg, default in zip(args, node.args.defaults, strict=True):
                    if arg.arg in ("scale_factor", "guidance_scale") and isinstance(default, ast.Constant) and \
                            isinstance(default.value, (int, float)):
                        found.setdefault(arg.arg, float(default.value))
    return found


def noise_shape(config: BundleConfig) -> list[int]:
    """The sample's shape without the batch: ``latent_shape`` or the ``noise`` entry's ``torch.randn(...)``."""
    if "latent_shape" in config.config:
        return [int(v) for v in config.resolve(config.config["latent_shape"], "latent_shape")]
    text = str(config.config.get("noise", ""))
    match = re.fullmatch(r"\$\s*torch\.randn?\((.*?)\)\s*(?:\.to\([^()]*\))?\s*", text)
    if match is None:
        raise MeddiffError(f"{config.path} states no latent_shape and no noise = torch.randn(shape) "
                           "— meddiff cannot tell the sample's shape")
    shape = config.resolve("$" + match.group(1), "noise")
    shape = list(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else list(shape)
    if not all(isinstance(v, int) for v in shape) or len(shape) not in (4, 5):
        raise MeddiffError(f"{config.path}: noise has shape {shape}; a batch of 2D or 3D samples is expected")
    return shape[1:]


def schedule(arguments: dict, path: Path) -> dict:
    """A ``NoiseSchedule`` (as a dict) from MONAI's DDPM/DDIM scheduler arguments (MONAI's defaults where unset:
    linear betas 1e-4..0.02, epsilon, clip_sample True), with the sampling steps where MONAI's schedulers put them
    (``linspace``: T - 1 down to 0)."""
    for name, default in (("steps_offset", 0), ("set_alpha_to_one", True), ("variance_type", "fixed_small")):
        if arguments.get(name, default) != default:
            raise MeddiffError(f"{path}: the scheduler's {name} {arguments[name]!r} is not supported "
                               f"(meddiff samples with {default!r})")
    try:
        return {"kind": "ddpm", "num_train_timesteps": int(arguments.get("num_train_timesteps", 1000)),
                "beta_schedule": MONAI_BETA_SCHEDULES[arguments.get("schedule", "linear_beta")],
                "prediction": MONAI_PREDICTIONS[arguments.get("prediction_type", "epsilon")],
                "beta_start": float(arguments.get("beta_start", 0.0001)),
                "beta_end": float(arguments.get("beta_end", 0.02)),
                "clip_sample": bool(arguments.get("clip_sample", True)), "timestep_spacing": "linspace"}
    except KeyError as exc:
        raise MeddiffError(f"{path}: the scheduler's {first_line(exc)} is not one meddiff knows") from None


def unet_config(arguments: dict, scalars: dict | None = None) -> dict:
    """``UNetConfig`` fields from MONAI's (or GenerativeModels') ``DiffusionModelUNet`` arguments; ``scalars``: the
    model's scalar conditions (``scalar_conditioning``), whose channels are part of the UNet's input."""
    channels = arguments.get("channels", arguments.get("num_channels", [32, 64, 64, 64]))
    scalar_channels = len(scalars["names"]) if scalars and scalars["as_channels"] else 0
    config = {"spatial_dims": arguments["spatial_dims"], "in_channels": arguments["in_channels"] - scalar_channels,
              "out_channels": arguments["out_channels"], "channels": list(channels),
              "attention_levels": list(arguments.get("attention_levels", [False, False, True, True])),
              "num_res_blocks": arguments.get("num_res_blocks", 2),
              "num_head_channels": arguments.get("num_head_channels", 8),
              "norm_num_groups": arguments.get("norm_num_groups", 32),
              "num_class_embeds": arguments.get("num_class_embeds"),
              "cross_attention_dim": arguments.get("cross_attention_dim") if arguments.get("with_conditioning")
              else None,
              "scalar_channels": scalar_channels}
    for name in ("norm_eps", "resblock_updown", "transformer_num_layers", "upcast_attention", "include_fc",
                 "use_combined_linear"):
        if name in arguments:
            config[name] = arguments[name]
    return config


def scalar_conditioning(config: BundleConfig, meta: dict, unet: dict) -> dict | None:
    """The bundle's scalar conditions (``ScalarConditioning`` fields), from a ``conditioning`` entry that builds
    ``torch.tensor([[@a, @b, ...]])``: the referenced names in order, their values as defaults, the range its
    metadata gives a tabular input; as context when the UNet's cross-attention width is their number, as channels
    when its input has that many channels more than its output. None without such an entry."""
    text = str(config.config.get("conditioning", ""))
    match = re.search(r"torch\.tensor\(\s*\[\s*\[([^\]]*)\]\s*\]", text)
    if match is None:
        return None
    names = re.findall(r"@(\w+)", match.group(1))
    if not names or len(names) != len(match.group(1).split(",")):
        raise MeddiffError(f"{config.path}: conditioning {text[:60]!r} is not a list of @references")
    inputs = meta.get("network_data_format", {}).get("inputs", {})
    ranges = [v.get("value_range") for v in inputs.values() if isinstance(v, dict) and v.get("type") == "tabular"]
    if len(ranges) != 1 or not isinstance(ranges[0], list) or len(ranges[0]) != 2:
        raise MeddiffError(f"{config.path.parent / 'metadata.json'} states no value_range of a tabular input: "
                           "meddiff cannot tell the conditions' ranges")
    as_context = bool(unet.get("with_conditioning")) and unet.get("cross_attention_dim") == len(names)
    as_channels = unet["in_channels"] - unet["out_channels"] == len(names)
    if not (as_context or as_channels):
        raise MeddiffError(f"{config.path}: the UNet takes the {len(names)} conditions neither as context "
                           "(cross_attention_dim) nor as input channels")
    return {"names": names, "ranges": [[float(ranges[0][0]), float(ranges[0][1])]] * len(names),
            "defaults": [float(config.resolve("@" + name, name)) for name in names],
            "as_context": as_context, "as_channels": as_channels}


def autoencoder_config(arguments: dict, scale_factor: float) -> dict:
    """``AutoencoderConfig`` fields from MONAI's ``AutoencoderKL`` arguments."""
    encoder = arguments.get("with_encoder_nonlocal_attn", True)
    if encoder != arguments.get("with_decoder_nonlocal_attn", True):
        raise MeddiffError("an autoencoder with non-local attention in only one of encoder and decoder is not "
                           "supported")
    config = {"spatial_dims": arguments["spatial_dims"], "in_channels": arguments.get("in_channels", 1),
              "out_channels": arguments.get("out_channels", 1),
              "channels": list(arguments.get("channels", arguments.get("num_channels", [32, 64, 64, 64]))),
              "latent_channels": arguments.get("latent_channels", 3),
              "num_res_blocks": arguments.get("num_res_blocks", 2),
              "attention_levels": list(arguments.get("attention_levels", [False, False, True, True])),
              "norm_num_groups": arguments.get("norm_num_groups", 32), "with_nonlocal_attn": bool(encoder),
              "scale_factor": scale_factor}
    for name in ("norm_eps", "include_fc", "use_combined_linear"):
        if name in arguments:
            config[name] = arguments[name]
    return config


def metadata(bundle: Path) -> dict:
    path = bundle / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        raise MeddiffError(f"cannot read {path} — give the bundle's metadata.json unchanged") from None


def described_image(meta: dict) -> dict:
    """Modality and voxel spacing as the bundle's metadata states them (``image_classes``: "... with 1.1x1.1x1.1 mm
    voxel size"); the output's values are the network's own (``intensity_range`` (-1, 1) keeps them as they are)."""
    text = " ".join(str(meta.get(k, "")) for k in ("image_classes", "name", "description")).lower()
    match = re.search(r"(\d+(?:\.\d+)?(?:\s*x\s*\d+(?:\.\d+)?)+)\s*mm", text)
    spacing = [float(v) for v in re.split(r"\s*x\s*", match.group(1))] if match else None
    modality = "MR" if re.search(r"\bmri?\b|t1w|flair", text) else (
        "DX" if re.search(r"x-ray|xray|radiograph", text) else ("CT" if re.search(r"\bct\b", text) else None))
    return {"spacing": spacing, "modality": modality}


def licence(bundle: Path, meta: dict) -> str:
    """The licence as the bundle states it: its LICENSE file's first line, else the metadata's field."""
    return licence_file_line(bundle) or str(meta.get("license", "not stated in the bundle"))


def checkpoint_state(path: Path) -> dict:
    """The state dict in a bundle's checkpoint: the file's dict of tensors, or the one such dict it holds
    (``{"state_dict": ...}``); read weights-only."""
    import torch

    from meddiff.weights import torch_load

    if not path.is_file():
        raise MeddiffError(f"{path} is missing — put the bundle's released weights under its models/ folder "
                           "(the bundle's large_files.yml names them)")
    state = torch_load(path, "bundle checkpoint")

    def tensors(value) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if tensors(state):
        return state
    nested = [v for v in state.values() if tensors(v)] if isinstance(state, dict) else []
    if len(nested) != 1:
        raise MeddiffError(f"{path} holds no state dict (a mapping of names to tensors) — give the bundle's "
                           "released checkpoint, unchanged")
    return nested[0]


def load_weights(network, state: dict, source: str) -> None:
    """``state`` into ``network``: as it is when its names are the network's, else through MONAI's
    ``load_old_state_dict`` (the GenerativeModels layout: ``to_q`` -> ``attn.to_q``, ``postconv`` -> ``conv``, ...)."""
    from meddiff.weights import check_fit

    remedy = "give the weights released with this bundle's config, unchanged"
    if set(state) == set(network.state_dict()) or not hasattr(network, "load_old_state_dict"):
        check_fit(network, state, f"{source} does not fit the bundle's config", remedy)
        network.load_state_dict(state)
        return
    try:
        network.load_old_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise MeddiffError(f"{source} does not fit the bundle's config, in MONAI's layout or GenerativeModels' "
                           f"({first_line(exc)}) — {remedy}") from None


def weights_paths(bundle: Path, config: BundleConfig, latent: bool) -> dict[str, Path]:
    """The checkpoint of each component: of the files the config names, the one with "autoencoder" in its name
    is the autoencoder's and the other the UNet's."""
    names = config.weight_files()
    autoencoder = [n for n in names if "autoencoder" in n.lower()]
    unet = [n for n in names if "autoencoder" not in n.lower()]
    if len(unet) != 1 or (latent and len(autoencoder) != 1):
        raise MeddiffError(f"{config.path} names the checkpoints {names or 'nowhere'}; meddiff needs one for the UNet"
                           f"{' and one with autoencoder in its name' if latent else ''}")
    paths = {"unet": bundle / "models" / unet[0]}
    if latent:
        paths["autoencoder"] = bundle / "models" / autoencoder[0]
    return paths


def load_bundle(bundle: str | Path, text_encoder: str | Path | None = None) -> Imported:
    """A model-zoo bundle folder (``configs/inference.json``, ``models/*.pt``) as one meddiff model. A bundle that
    encodes prompts with a Hugging Face CLIP text model (the CXR generator: Stable Diffusion 2's) needs that
    model's files, which bundles do not hold: ``text_encoder`` is a folder with its ``text_encoder/`` and
    ``tokenizer/``."""
    from meddiff.model import DiffusionModel, ModelConfig

    bundle = Path(bundle)
    path = bundle_config_path(bundle)
    if path is None:
        raise MeddiffError(f"{bundle} is not a MONAI bundle folder (no configs/inference.json)")
    config = BundleConfig(path)
    found = config.definitions()
    unet_args, scheduler_args = found["unet"][1], found["scheduler"][1]
    latent = "autoencoder" in found
    meta = metadata(bundle)
    scalars = scalar_conditioning(config, meta, unet_args)
    prompts = prompt_encoder(config) if scalars is None and unet_args.get("with_conditioning") else None
    if scalars is None and prompts is None and (unet_args.get("with_conditioning") or unet_args.get("num_class_embeds")
                                                or unet_args["in_channels"] != unet_args["out_channels"]):
        raise MeddiffError(f"{path}: the UNet is conditioned in a way meddiff does not read from bundles (it reads "
                           "scalar conditions given as torch.tensor([[@a, @b, ...]]))")
    defaults = sampler_defaults(bundle)
    shape = noise_shape(config)
    image = described_image(meta)
    autoencoder = autoencoder_config(found["autoencoder"][1], defaults.get("scale_factor", 1.0)) if latent else None
    downsample = 2 ** (len(autoencoder["channels"]) - 1) if latent else 1
    spatial = [side * downsample for side in shape[1:]]
    spacing = image["spacing"] if image["spacing"] and len(image["spacing"]) == len(spatial) else None
    encoder, folders = None, {}
    if prompts is not None:
        encoder, folders = clip_text_encoder(prompts, text_encoder)
    try:
        model_config = ModelConfig(
            unet=unet_config(unet_args, scalars), schedule=schedule(scheduler_args, path), autoencoder=autoencoder,
            scalars=scalars, text_encoder=None if encoder is None else {
                "spec": "component:text_encoder", "max_length": encoder.max_length, "padded": True},
            image={"shape": spatial, "spacing": spacing, "modality": image["modality"], "intensity_range": (-1.0, 1.0)})
    except (ValueError, TypeError, KeyError) as exc:
        raise MeddiffError(f"{path} does not describe a model meddiff can rebuild: {first_line(exc)}") from None
    if encoder is not None and encoder.dim != model_config.unet.cross_attention_dim:
        raise MeddiffError(f"the text encoder in {text_encoder} makes {encoder.dim}-wide states; the bundle's UNet "
                           f"attends to {model_config.unet.cross_attention_dim} — give {prompts}'s text encoder")
    model = DiffusionModel(model_config, text_encoder=encoder)
    for component, weights in weights_paths(bundle, config, latent).items():
        load_weights(model.networks[component], checkpoint_state(weights), f"{weights}")
    scheduler = "ddim" if scheduler_args["_class"] == "DDIMScheduler" else "ddpm"
    steps = _inference_steps(config) or (50 if scheduler == "ddim" else model_config.schedule.num_train_timesteps)
    notes = []
    if re.search(r"torch\.rand\(", str(config.config.get("noise", ""))):
        notes.append("The bundle's inference config draws its starting noise with torch.rand (uniform); meddiff "
                     "starts from Gaussian noise, what the model was trained to remove.")
    notes.append(f"Sampling steps fall where MONAI's {scheduler_args['_class']} puts them (linspace from "
                 f"{model_config.schedule.num_train_timesteps - 1} down to 0).")
    sampling = {"scheduler": scheduler, "steps": steps}
    if encoder is not None:
        sampling["guidance_scale"] = defaults.get("guidance_scale", 1.0)
        notes.append(f"Prompts are encoded by {prompts}'s CLIP text model (stored here under text_encoder/ and "
                     "tokenizer/), padded to its length as the bundle does; the unconditional prompt is empty.")
    return Imported(model.to("cpu"), "MONAI model-zoo bundle", bundle, str(meta.get("name", bundle.name)),
                    str(meta.get("version", "")), licence(bundle, meta), sampling, notes, folders)


def prompt_encoder(config: BundleConfig) -> str | None:
    """The Hugging Face repository whose CLIP text model the bundle encodes prompts with (``CLIPTextModel
    .from_pretrained("REPO", subfolder="text_encoder")``), or None."""
    for value in config.strings(config.config):
        match = re.search(r"CLIPTextModel\.from_pretrained\(\s*['\"]([^'\"]+)['\"]", value)
        if match:
            return match.group(1)
    return None


def clip_text_encoder(repository: str, folder: str | Path | None):
    """The CLIP text encoder (Stable Diffusion's way of encoding) from ``folder``'s ``text_encoder/`` and
    ``tokenizer/``, and those two folders to store with the model."""
    from meddiff.encoders.text import load_text_encoder

    if folder is None:
        raise MeddiffError(f"this bundle encodes prompts with {repository}'s CLIP text model, which bundles do not "
                           "hold: download its text_encoder/ and tokenizer/ folders and run meddiff import BUNDLE OUT "
                           "--text-encoder FOLDER")
    folder = Path(folder)
    encoder = load_text_encoder("component:text_encoder", padded=True, folder=folder)
    return encoder, {"text_encoder": folder / "text_encoder", "tokenizer": folder / "tokenizer"}


def _inference_steps(config: BundleConfig) -> int | None:
    """The step count the bundle samples with (``num_inference_steps`` in ``set_timesteps`` or its own entry)."""
    for value in config.strings(config.config):
        match = re.search(r"num_inference_steps\s*=\s*(@?\w+)", value)
        if match:
            steps = config.resolve(match.group(1), "num_inference_steps") if match.group(1).startswith("@") else \
                match.group(1)
            try:
                return int(steps)
            except (TypeError, ValueError):
                return None
    return None
