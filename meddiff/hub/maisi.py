"""MAISI's released CT generator as a meddiff model: a MONAI model-zoo bundle folder -> ``DiffusionModel``.

A MAISI bundle (``maisi_ct_generative``) holds ``configs/inference.json`` (the network definitions, the noise
scheduler, the output size and spacing) and, under ``models/``, the autoencoder's state dict, the diffusion
UNet's checkpoint (``unet_state_dict`` and the latent ``scale_factor``) and the ControlNet's checkpoint
(``controlnet_state_dict``). ``meddiff export BUNDLE_DIR OUT_DIR`` writes them as one meddiff folder (config.json +
one safetensors per network), which ``meddiff generate --condition labels.nii.gz`` then samples. MAISI's images
are [0, 1] for -1000..1000 HU: the model's ``intensity_range`` (-3000, 1000) maps its [-1, 1] onto exactly that.

The JSON is read, never run: MONAI's ``ConfigParser`` would evaluate its ``$`` expressions (Python code from a
downloaded file), so plain ``@name`` references are resolved here and the weight file names are read out of the
path expressions. Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain values only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from meddiff.errors import MeddiffError, first_line
from meddiff.hub.bundle import MONAI_BETA_SCHEDULES, MONAI_PREDICTIONS, licence, metadata
from meddiff.hub.imported import Imported
from meddiff.model import DiffusionModel, ModelConfig

INFERENCE = Path("configs") / "inference.json"
WEIGHTS = {"autoencoder": "trained_autoencoder_path", "unet": "trained_diffusion_path",
           "controlnet": "trained_controlnet_path"}
REGIONS = ("head_neck", "chest", "abdomen", "lower")  # MAISI's body regions, in its one-hot order


def is_maisi_bundle(path: str | Path) -> bool:
    """A bundle whose inference config builds MAISI's networks."""
    config = Path(path) / INFERENCE
    try:
        return config.is_file() and "generation.maisi.networks" in config.read_text(errors="replace")
    except OSError:
        return False


def _resolve(value, config: dict):
    """``value`` with every plain ``"@name"`` reference replaced by the top-level entry it names."""
    if isinstance(value, str) and re.fullmatch(r"@\w+", value):
        return _resolve(config[value[1:]], config)
    if isinstance(value, dict):
        return {k: _resolve(v, config) for k, v in value.items() if k != "_target_"}
    if isinstance(value, list):
        return [_resolve(v, config) for v in value]
    return value


def _weights_file(bundle: Path, config: dict, key: str) -> Path:
    """The file an entry such as ``"$@model_dir + '/autoencoder_epoch273.pt'"`` names, under ``models/``."""
    match = re.search(r"['\"]/?([^'\"]+\.(?:pt|pth|ckpt))['\"]", str(config.get(key, "")))
    if match is None:
        raise MeddiffError(f"{bundle / INFERENCE} names no weights file for {key} — give a MAISI bundle folder")
    return bundle / "models" / Path(match.group(1)).name


def _load(path: Path) -> dict:
    from meddiff.weights import torch_load

    if not path.is_file():
        raise MeddiffError(f"{path} is missing — put MAISI's released weights under the bundle's models/ "
                           "(see README: MAISI's released weights)")
    state = torch_load(path, "MAISI checkpoint")  # weights_only: a payload is refused, never run
    if not isinstance(state, dict):
        raise MeddiffError(f"{path} holds no state dict — give MAISI's released checkpoint, unchanged")
    return state


def _schedule(definition: dict) -> dict:
    target = str(definition.get("_target_", ""))
    args = _resolve(definition, {})
    if target.endswith("RFlowScheduler"):
        return {"kind": "rflow", "prediction": "v", "num_train_timesteps": int(args.get("num_train_timesteps", 1000))}
    if not target.endswith("DDPMScheduler") and not target.endswith("DDIMScheduler"):
        raise MeddiffError(f"unknown MAISI noise scheduler {target!r} — a DDPM/DDIM or RFlow scheduler is expected")
    prediction = MONAI_PREDICTIONS[args.get("prediction_type", "epsilon")]
    return {"kind": "ddpm", "num_train_timesteps": int(args.get("num_train_timesteps", 1000)),
            "beta_schedule": MONAI_BETA_SCHEDULES[args.get("schedule", "linear_beta")], "prediction": prediction,
            "beta_start": float(args.get("beta_start", 0.0001)), "beta_end": float(args.get("beta_end", 0.02))}


def _structures(bundle: Path, config: dict) -> dict[int, str]:
    """MAISI's label names (``label_dict.json``: ``{name: label}``) where the bundle has the file."""
    match = re.search(r"['\"]/?([^'\"]+\.json)['\"]", str(config.get("label_dict_json", "")))
    path = bundle / "configs" / Path(match.group(1)).name if match else None
    if path is None or not path.is_file():
        return {}
    return {int(label): name for name, label in json.loads(path.read_text()).items() if int(label) > 0}


def load_maisi_bundle(bundle: str | Path) -> DiffusionModel:
    """The bundle's autoencoder, diffusion UNet and ControlNet as one meddiff model (weights loaded)."""
    bundle = Path(bundle)
    try:
        config = json.loads((bundle / INFERENCE).read_text())
    except (OSError, ValueError) as exc:
        raise MeddiffError(f"cannot read {bundle / INFERENCE}: {first_line(exc)} "
                           "— give a MAISI bundle folder") from None
    try:
        autoencoder = _resolve(config["autoencoder_def"], config)
        unet = _resolve(config["diffusion_unet_def"], config)
        controlnet = _resolve(config["controlnet_def"], config) if "controlnet_def" in config else None
        schedule = _schedule(config["noise_scheduler"])
        size = [int(v) for v in _resolve(config["output_size"], config)]
        spacing = [float(v) for v in _resolve(config["spacing"], config)]
        region = [r for r in (_resolve(config.get("body_region", ["chest"]), config)) if r in REGIONS] or ["chest"]
        window = [int(v) // 4 for v in _resolve(config.get("autoencoder_sliding_window_infer_size", []), config)]
    except (KeyError, TypeError, ValueError) as exc:
        raise MeddiffError(f"{bundle / INFERENCE} is not a MAISI inference config ({first_line(exc)})") from None
    diffusion_file = _weights_file(bundle, config, WEIGHTS["unet"])
    diffusion = _load(diffusion_file)
    if "unet_state_dict" not in diffusion:
        raise MeddiffError(f"{diffusion_file} holds no unet_state_dict")
    one_hot = [[int(REGIONS.index(region[0]) == i) for i in range(4)], [int(REGIONS.index(region[-1]) == i)
                                                                         for i in range(4)]]
    model_config = ModelConfig(
        unet={"family": "maisi", "spatial_dims": unet["spatial_dims"], "in_channels": unet["in_channels"],
              "out_channels": unet["out_channels"], "channels": unet["num_channels"],
              "attention_levels": unet["attention_levels"], "num_res_blocks": unet.get("num_res_blocks", 2),
              "num_head_channels": unet.get("num_head_channels", 8), "norm_num_groups": unet.get("norm_num_groups", 32),
              "include_region_inputs": bool(unet.get("include_top_region_index_input", False)),
              "include_spacing_input": bool(unet.get("include_spacing_input", False))},
        schedule=schedule,
        image={"shape": size, "spacing": spacing, "modality": "CT", "intensity_range": (-3000.0, 1000.0)},
        autoencoder={
            "family": "maisi", "spatial_dims": autoencoder["spatial_dims"], "in_channels": autoencoder["in_channels"],
            "out_channels": autoencoder["out_channels"], "channels": autoencoder["num_channels"],
            "latent_channels": autoencoder["latent_channels"], "num_res_blocks": autoencoder["num_res_blocks"],
            "attention_levels": autoencoder["attention_levels"], "norm_num_groups": autoencoder["norm_num_groups"],
            "with_nonlocal_attn": bool(autoencoder.get("with_encoder_nonlocal_attn", False)),
            "maisi_options": {k: autoencoder[k] for k in ("num_splits", "dim_split", "norm_float16",
                                                          "use_convtranspose") if k in autoencoder},
            "scale_factor": float(diffusion.get("scale_factor", 1.0)), "decode_tile": window or None},
        controlnet=None if controlnet is None else {
            "conditioning_channels": controlnet["conditioning_embedding_in_channels"],
            "conditioning_embedding_channels": controlnet["conditioning_embedding_num_channels"],
            "structures": _structures(bundle, config)},
        region={"top": one_hot[0], "bottom": one_hot[1]},
    )
    model = DiffusionModel(model_config)
    states = {"unet": diffusion["unet_state_dict"],
              "autoencoder": _load(_weights_file(bundle, config, WEIGHTS["autoencoder"]))}
    if controlnet is not None:
        control = _load(_weights_file(bundle, config, WEIGHTS["controlnet"]))
        states["controlnet"] = control.get("controlnet_state_dict", control)
    for name, state in states.items():
        try:
            model.networks[name].load_state_dict(state)
        except RuntimeError as exc:
            raise MeddiffError(f"the MAISI {name} weights do not fit {bundle / INFERENCE}: {first_line(exc)}") from None
    return model.to("cpu")


def imported(bundle: str | Path) -> Imported:
    """``load_maisi_bundle`` with its source, licence and published sampling, for ``meddiff import``."""
    bundle = Path(bundle)
    model = load_maisi_bundle(bundle)
    meta = metadata(bundle)
    config = json.loads((bundle / INFERENCE).read_text())
    rflow = model.config.schedule.kind == "rflow"
    steps = config.get("num_inference_steps")
    steps = steps if isinstance(steps, int) else (30 if rflow else 1000)
    return Imported(model, "MAISI bundle", bundle, str(meta.get("name", bundle.name)), str(meta.get("version", "")),
                    licence(bundle, meta), {"scheduler": "rflow" if rflow else "ddpm", "steps": steps},
                    ["Generate from a label map: meddiff generate --condition labels.nii.gz."])
