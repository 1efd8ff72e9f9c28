"""diffusers pipeline folders (the Stable Diffusion family, e.g. RoentGen for chest X-rays) -> a meddiff model.

``model_index.json`` names each component's library and class. meddiff reads the text-to-image layout: ``unet/`` (a
``UNet2DConditionModel``), ``vae/`` (an ``AutoencoderKL``), ``text_encoder/`` (a ``CLIPTextModel``), ``tokenizer/``
and ``scheduler/``; a safety checker or feature extractor is not used. A component of another class, or a folder that
brings Python code (a custom pipeline's ``.py`` file, a config's ``auto_map``), is refused: nothing in the folder runs.
The networks are built from their ``config.json`` and their weights read as tensors (safetensors, or a ``.bin``
through torch's weights-only unpickler); the images come back as diffusers returns them, [0, 1].
"""

from __future__ import annotations

import json
from pathlib import Path

from meddiff.diffusion.schedulers import BETA_SCHEDULE_OF, PREDICTION_OF
from meddiff.errors import MeddiffError, first_line
from meddiff.hub.imported import Imported, licence_file_line

INDEX = "model_index.json"
COMPONENTS = {"unet": ("diffusers", {"UNet2DConditionModel"}), "vae": ("diffusers", {"AutoencoderKL"}),
              "text_encoder": ("transformers", {"CLIPTextModel"}),
              "tokenizer": ("transformers", {"CLIPTokenizer", "CLIPTokenizerFast"})}
UNUSED = {"safety_checker", "feature_extractor", "image_encoder"}
SCHEDULERS = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
              "DPMSolverMultistepScheduler": "dpm++2m", "EulerDiscreteScheduler": "euler",
              "UniPCMultistepScheduler": "unipc"}
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def is_pipeline_folder(path: str | Path) -> bool:
    return (Path(path) / INDEX).is_file()


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise MeddiffError(f"{path} is missing — give the pipeline folder as published (model_index.json, unet/, "
                           "vae/, text_encoder/, tokenizer/, scheduler/)") from None
    except (OSError, ValueError) as exc:
        raise MeddiffError(f"cannot read {path}: {first_line(exc)}") from None
    if not isinstance(value, dict):
        raise MeddiffError(f"{path} is not a diffusers config (no mapping)")
    if "auto_map" in value:
        raise MeddiffError(f"{path} asks to run its own Python code (auto_map), which meddiff never does")
    return value


def check_index(folder: Path) -> dict:
    """``model_index.json`` checked: the components meddiff reads, each of a known class; no Python code."""
    code = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.py"))
    if code:
        raise MeddiffError(f"{folder} holds Python code ({code[0]}): a custom pipeline, which meddiff never runs — "
                           "use a folder of the standard text-to-image layout")
    index = read_json(folder / INDEX)
    for name, (library, classes) in COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == library and entry[1] in classes):
            raise MeddiffError(f"{folder / INDEX}: {name} is {entry!r}; meddiff reads a text-to-image pipeline whose "
                               f"{name} is {library}'s {' or '.join(sorted(classes))}")
    for name, entry in index.items():
        if name.startswith("_") or name in COMPONENTS or name in UNUSED or name == "scheduler" or \
                not isinstance(entry, list):
            continue
        if entry != [None, None]:
            raise MeddiffError(f"{folder / INDEX}: component {name} ({entry}) is not one meddiff reads")
    return index


def network_state(folder: Path) -> dict:
    """The weights of one component folder, read as tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from meddiff.weights import torch_load

    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                try:
                    return load_file(path)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise MeddiffError(f"cannot read {path}: {first_line(exc)}") from None
            state = torch_load(path, "diffusers weights")
            if not isinstance(state, dict):
                raise MeddiffError(f"{path} holds no state dict")
            return state
    raise MeddiffError(f"{folder} holds no weights ({' or '.join(WEIGHT_NAMES)})")


def schedule(config: dict, path: Path) -> tuple[dict, str]:
    """A ``NoiseSchedule`` (as a dict) and meddiff's name for the pipeline's own sampler."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise MeddiffError(f"{path}: scheduler {name!r} is not one meddiff samples with ({', '.join(SCHEDULERS)})")
    if config.get("trained_betas") is not None:
        raise MeddiffError(f"{path}: a scheduler with trained_betas is not supported")
    try:
        values = {"kind": "ddpm", "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                  "beta_schedule": BETA_SCHEDULE_OF[config.get("beta_schedule", "linear")],
                  "beta_start": float(config.get("beta_start", 0.0001)),
                  "beta_end": float(config.get("beta_end", 0.02)),
                  "prediction": PREDICTION_OF[config.get("prediction_type", "epsilon")],
                  "clip_sample": bool(config.get("clip_sample", False)),
                  "timestep_spacing": config.get("timestep_spacing", "leading")}
    except KeyError as exc:
        raise MeddiffError(f"{path}: {first_line(exc)} is not a setting meddiff knows") from None
    for key in ("steps_offset", "set_alpha_to_one"):
        if key in config:
            values[key] = config[key]
    return values, SCHEDULERS[name]


def load_pipeline_folder(folder: str | Path) -> Imported:
    """A diffusers text-to-image pipeline folder as one meddiff model (UNet, autoencoder, CLIP text encoder)."""
    from meddiff.encoders.text import load_text_encoder
    from meddiff.hub.bundle import load_weights
    from meddiff.model import DiffusionModel, ModelConfig

    folder = Path(folder)
    index = check_index(folder)
    unet, vae = read_json(folder / "unet" / "config.json"), read_json(folder / "vae" / "config.json")
    for name, config in (("unet", unet), ("vae", vae)):
        if config.get("_class_name") != index[name][1]:
            raise MeddiffError(f"{folder / name / 'config.json'} is a {config.get('_class_name')!r}, not the "
                               f"{index[name][1]} model_index.json names")
    if vae.get("shift_factor") is not None or not isinstance(unet.get("cross_attention_dim"), int):
        raise MeddiffError(f"{folder}: a VAE shift_factor or a UNet with several cross-attention widths is not "
                           "supported (Stable Diffusion 1-2 layout expected)")
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    noise_schedule, sampler = schedule(read_json(scheduler_path), scheduler_path)
    encoder = load_text_encoder("component:text_encoder", padded=True, folder=folder)
    if encoder.dim != unet["cross_attention_dim"]:
        raise MeddiffError(f"{folder}: the text encoder makes {encoder.dim}-wide states, the UNet attends to "
                           f"{unet['cross_attention_dim']}")
    blocks, levels = list(vae.get("block_out_channels", [64])), list(unet.get("block_out_channels", [320]))
    sample = unet.get("sample_size", 64)
    sample = [sample, sample] if isinstance(sample, int) else list(sample)
    downsample = 2 ** (len(blocks) - 1)
    try:
        config = ModelConfig(
            unet={"family": "diffusers", "diffusers": unet, "spatial_dims": 2, "in_channels": unet["in_channels"],
                  "out_channels": unet["out_channels"], "channels": levels, "attention_levels": [True] * len(levels),
                  "cross_attention_dim": unet["cross_attention_dim"],
                  "norm_num_groups": int(unet.get("norm_num_groups", 32))},
            autoencoder={"family": "diffusers", "diffusers": vae, "spatial_dims": 2,
                         "in_channels": vae.get("in_channels", 3), "out_channels": vae.get("out_channels", 3),
                         "channels": blocks, "latent_channels": vae.get("latent_channels", 4),
                         "attention_levels": [False] * len(blocks), "norm_num_groups": vae.get("norm_num_groups", 32),
                         "scale_factor": float(vae.get("scaling_factor", 0.18215))},
            schedule=noise_schedule,
            image={"shape": [side * downsample for side in sample], "intensity_range": (0.0, 1.0)},
            text_encoder={"spec": "component:text_encoder", "max_length": encoder.max_length, "padded": True})
    except (ValueError, TypeError, KeyError) as exc:
        raise MeddiffError(f"{folder} does not describe a model meddiff can rebuild: {first_line(exc)}") from None
    model = DiffusionModel(config, text_encoder=encoder)
    for name, part in (("unet", "unet"), ("autoencoder", "vae")):
        state = {f"model.{k}": v for k, v in network_state(folder / part).items()}
        load_weights(model.networks[name], state, str(folder / part))
    return Imported(model.to("cpu"), "diffusers pipeline folder", folder, folder.name, "",
                    _licence(folder), {"scheduler": sampler, "steps": 50, "guidance_scale": 7.5},
                    ["Images come back as diffusers returns them, 0 to 1 (not clipped); the modality is not stated "
                     "by the folder."],
                    {"text_encoder": folder / "text_encoder", "tokenizer": folder / "tokenizer"})


def _licence(folder: Path) -> str:
    """The licence a model card's front matter (``license: ...``) or a LICENSE file states."""
    card = folder / "README.md"
    if card.is_file():
        for line in card.read_text(errors="replace").splitlines()[:40]:
            if line.lower().startswith("license:"):
                return line.split(":", 1)[1].strip()
    return licence_file_line(folder) or "not stated in the folder"
