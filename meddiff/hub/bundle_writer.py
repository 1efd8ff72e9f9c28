"""A meddiff model folder as a MONAI bundle, which ``python -m monai.bundle run --config_file configs/inference.json``
samples with MONAI's own classes: ``DiffusionModelUNet`` (and ``AutoencoderKL``), ``DDIMScheduler`` and
``DiffusionInferer`` (``LatentDiffusionInferer`` with the model's scale factor), then ``SaveImage`` writes the sample
in the model's physical units and spacing as NIfTI.

The bundle samples exactly as ``meddiff generate --scheduler ddim --steps N --seed S`` does: the same starting noise
(``torch.randn`` from a generator seeded with ``seed``) and the same timesteps, written into the config as a list
because MONAI's DDIM spaces them otherwise. Weights are plain state dicts (``models/*.pt``), the card is
``docs/README.md``. Pixel-space and latent models of MONAI's network family without further conditioning export;
others are refused in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from meddiff.diffusion.schedulers import PREDICTION_TYPES
from meddiff.errors import MeddiffError
from meddiff.files import staged_folder
from meddiff.hub.bundle import MONAI_BETA_SCHEDULES
from meddiff.model import DiffusionModel

BUNDLE_PARTS = ("configs", "models", "docs")  # what export-bundle writes (not a run's output/)
MONAI_SCHEDULE_NAMES = {ours: name for name, ours in MONAI_BETA_SCHEDULES.items()}
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
UNET_ARGUMENTS = ("spatial_dims", "in_channels", "out_channels", "channels", "attention_levels", "num_res_blocks",
                  "num_head_channels", "norm_num_groups", "norm_eps", "resblock_updown", "transformer_num_layers",
                  "upcast_attention", "include_fc", "use_combined_linear")
AUTOENCODER_ARGUMENTS = ("spatial_dims", "in_channels", "out_channels", "channels", "latent_channels",
                         "num_res_blocks", "attention_levels", "norm_num_groups", "norm_eps", "include_fc",
                         "use_combined_linear")


def check_exportable(model: DiffusionModel) -> None:
    config = model.config
    if config.unet.family != "monai" or (config.autoencoder and config.autoencoder.family != "monai"):
        raise MeddiffError("only models of MONAI's network family export as a MONAI bundle (this one is "
                           f"{config.unet.family}) — MAISI and diffusers models are published in their own formats")
    conditioned = [name for name, present in (
        ("a text encoder", config.text_encoder), ("a ControlNet", config.controlnet), ("scalar conditions",
                                                                                      config.scalars),
        ("classes", config.unet.num_class_embeds), ("concatenated channels", config.unet.concat_channels),
        ("body-region inputs", config.unet.include_region_inputs)) if present]
    if conditioned:
        raise MeddiffError(f"this model takes {conditioned[0]}; meddiff exports unconditional generators as MONAI "
                           "bundles")
    if not config.generates or config.schedule.kind != "ddpm":
        raise MeddiffError("this model does not generate with a DDPM-family schedule (a denoising prior or a "
                           "rectified-flow model): it has no MONAI bundle sampling loop")


def inference_config(model: DiffusionModel, steps: int, seed: int) -> dict:
    """``configs/inference.json``: MONAI and torch classes only; ``run`` loads, samples and saves."""
    config, schedule = model.config, model.config.schedule
    sampler = schedule.scheduler("ddim")
    sampler.set_timesteps(steps)
    unet = config.unet.model_dump()
    shape = config.sample_shape()
    channels = config.autoencoder.latent_channels if config.autoencoder else config.unet.out_channels
    low, high = config.image.intensity_range
    spacing = list(config.image.spacing or [1.0] * len(shape))
    settings = {
        "imports": ["$import torch", "$import monai"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "seed": seed,
        "num_inference_steps": steps,
        "timesteps": [int(t) for t in sampler.timesteps],
        "noise_shape": [1, channels, *shape],
        "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet",
                        **{k: unet[k] for k in UNET_ARGUMENTS}},
        "network": "$@network_def.to(@device).eval()",
        "load_network": "$@network.load_state_dict(torch.load(@bundle_root + '/models/model.pt', "
                        "map_location=@device, weights_only=True))",
        "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler",
                      "num_train_timesteps": schedule.num_train_timesteps,
                      "schedule": MONAI_SCHEDULE_NAMES[schedule.beta_schedule],
                      **({} if schedule.beta_schedule == "cosine" else {  # MONAI's cosine takes no beta range
                          "beta_start": schedule.beta_start, "beta_end": schedule.beta_end}),
                      "prediction_type": PREDICTION_TYPES[schedule.prediction], "clip_sample": schedule.clip_sample},
        "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=@num_inference_steps)",
        "use_timesteps": "$setattr(@scheduler, 'timesteps', torch.tensor(@timesteps))",
        "noise": "$torch.randn(@noise_shape, generator=torch.Generator().manual_seed(@seed)).to(@device)",
        "slope": (high - low) / 2.0,
        "intercept": (high + low) / 2.0,
        "affine": "$torch.diag(torch.tensor(" + json.dumps([*spacing, *[1.0] * (4 - len(spacing))]) + "))",
        # resample onto its own affine (original_affine below): a no-op that MONAI 1.6's writer needs, whose
        # resample=False path fails on a missing output shape
        "saver": {"_target_": "monai.transforms.SaveImage", "output_dir": "@output_dir", "output_postfix": "sample",
                  "output_ext": ".nii.gz", "separate_folder": False, "resample": True},
    }
    if (config.image.modality or "").upper() == "CT":
        settings["clip"] = [-1024.0, 3071.0]  # what meddiff generate clips CT to (CT_RANGE)
        physical = "torch.clamp(@sample[0] * @slope + @intercept, *@clip)"
    else:
        physical = "(@sample[0] * @slope + @intercept)"
    if config.autoencoder is None:
        settings["inferer"] = {"_target_": "monai.inferers.DiffusionInferer", "scheduler": "@scheduler"}
        settings["sample"] = ("$@inferer.sample(input_noise=@noise, diffusion_model=@network, scheduler=@scheduler, "
                              "verbose=False)")
        load = ["$@load_network"]
    else:
        autoencoder = config.autoencoder.model_dump()
        settings["autoencoder_def"] = {"_target_": "monai.networks.nets.AutoencoderKL",
                                       **{k: autoencoder[k] for k in AUTOENCODER_ARGUMENTS},
                                       "with_encoder_nonlocal_attn": autoencoder["with_nonlocal_attn"],
                                       "with_decoder_nonlocal_attn": autoencoder["with_nonlocal_attn"]}
        settings["autoencoder"] = "$@autoencoder_def.to(@device).eval()"
        settings["load_autoencoder"] = ("$@autoencoder.load_state_dict(torch.load(@bundle_root + "
                                        "'/models/model_autoencoder.pt', map_location=@device, weights_only=True))")
        settings["inferer"] = {"_target_": "monai.inferers.LatentDiffusionInferer", "scheduler": "@scheduler",
                               "scale_factor": config.autoencoder.scale_factor}
        settings["sample"] = ("$@inferer.sample(input_noise=@noise, autoencoder_model=@autoencoder, "
                              "diffusion_model=@network, scheduler=@scheduler, verbose=False)")
        load = ["$@load_network", "$@load_autoencoder"]
    # channel first, three spatial axes (a 2D sample as one slice), as MONAI's NIfTI writer takes it with a 4x4 affine
    volume = f"{physical}.float().mean(dim=0, keepdim=True).cpu()" + (".unsqueeze(-1)" if len(shape) == 2 else "")
    spatial = [*config.image.shape, 1][:3]
    settings["image"] = (f"$monai.data.MetaTensor({volume}, affine=@affine, "
                         f"meta={{'filename_or_obj': 'generated', 'spatial_shape': {spatial}, "
                         "'original_affine': @affine})")
    settings["run"] = [*load, "$@set_timesteps", "$@use_timesteps", "$@saver(@image)"]
    return settings


def metadata(model: DiffusionModel, name: str) -> dict:
    """``configs/metadata.json`` with the fields of MONAI's bundle schema."""
    import monai
    import numpy

    config = model.config
    return {
        "schema": SCHEMA, "version": "0.1.0", "changelog": {"0.1.0": "exported by meddiff export-bundle"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__, "required_packages_version": {"nibabel": _version("nibabel")},
        "supported_apps": {}, "name": name, "task": "image synthesis",
        "description": f"A {len(config.image.shape)}D {'latent ' if config.autoencoder else ''}diffusion model "
                       f"exported from meddiff; samples from Gaussian noise with DDIM.",
        "authors": "meddiff", "copyright": "see docs/README.md", "data_source": "see docs/README.md",
        "data_type": "nibabel", "image_classes": f"{config.image.modality or 'image'} "
                                                 f"{'x'.join(map(str, config.image.shape))}",
        "eval_metrics": {}, "intended_use": "Research only; not for clinical use.", "references": [],
        "network_data_format": {
            "inputs": {"image": {"type": "noise", "format": "image", "num_channels": (
                config.autoencoder.latent_channels if config.autoencoder else config.unet.in_channels),
                "spatial_shape": config.sample_shape(), "dtype": "float32", "value_range": [],
                "is_patch_data": False, "channel_def": {}}},
            "outputs": {"pred": {"type": "image", "format": "image", "num_channels": 1,
                                 "spatial_shape": config.image.shape, "dtype": "float32",
                                 "value_range": list(config.image.intensity_range), "is_patch_data": False,
                                 "channel_def": {"0": config.image.modality or "image"}}}},
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def write_bundle(model: DiffusionModel, folder: str | os.PathLike, out: str | os.PathLike, steps: int = 50,
                 seed: int = 0, overwrite: bool = False) -> Path:
    """``model`` (loaded from ``folder``) as a bundle at ``out``, staged beside it and renamed when complete."""
    check_exportable(model)
    folder = Path(folder)
    if not 1 <= steps <= model.config.schedule.num_train_timesteps:
        raise MeddiffError(f"--steps must be from 1 to {model.config.schedule.num_train_timesteps}, not {steps}")
    with staged_folder(out, overwrite, BUNDLE_PARTS.__contains__) as stage:
        for part in BUNDLE_PARTS:
            (stage / part).mkdir()
        (stage / "configs" / "inference.json").write_text(json.dumps(inference_config(model, steps, seed), indent=2))
        (stage / "configs" / "metadata.json").write_text(json.dumps(metadata(model, folder.name), indent=2))
        torch.save({k: v.float() for k, v in model.unet.state_dict().items()}, stage / "models" / "model.pt")
        if model.autoencoder is not None:
            torch.save({k: v.float() for k, v in model.autoencoder.state_dict().items()},
                       stage / "models" / "model_autoencoder.pt")
        card = folder / "README.md"
        text = card.read_text() if card.is_file() else f"# {folder.name}\n\nExported from a meddiff model folder.\n"
        (stage / "docs" / "README.md").write_text(
            text + f"\n\n## As a MONAI bundle\n\n`python -m monai.bundle run --config_file configs/inference.json` "
                   f"writes `output/*_sample.nii.gz`: {steps} DDIM steps from the noise of seed {seed} (override with "
                   "`--seed S`), the image `meddiff generate --scheduler ddim --steps "
                   f"{steps} --seed S` makes from the model folder.\n")
    return Path(out)
