"""The one migration from flat module arguments (older configs and checkpoints) to the nested, typed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from meddiff.cli.main import main
from meddiff.errors import MeddiffError
from meddiff.training import AutoencoderModule, DiffusionModule
from meddiff.training.migrate import is_flat, moved_key, nested_arguments

CONFIGS = Path(__file__).parent.parent / "configs"

# model.init_args of configs/smoke/ddpm_2d.yaml before the arguments were nested
OLD_SMOKE_ARGS = {
    "spatial_dims": 2, "channels": [16, 32], "attention_levels": [False, True], "num_res_blocks": 1,
    "num_head_channels": 16, "norm_num_groups": 16, "num_train_timesteps": 1000, "beta_schedule": "linear",
    "prediction": "eps", "lr": 0.001, "ema_decay": 0.9, "image_shape": [32, 32], "image_spacing": [4.0, 4.0],
    "modality": "MR",
}
# the hyper_parameters an older meddiff fit saved in a DiffusionModule checkpoint: every flat argument
OLD_CHECKPOINT_HPARAMS = {
    "_class_path": "meddiff.training.DiffusionModule", "spatial_dims": 2, "channels": [16, 32],
    "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 16, "norm_num_groups": 16,
    "num_class_embeds": 3, "class_key": "label", "concat_channels": 0, "concat_key": None, "task": "generate",
    "outside_mask_weight": 1.0, "valid_key": None, "autoencoder": None, "text_encoder": None, "report_key": "report",
    "condition_dropout": 0.1, "num_train_timesteps": 500, "beta_schedule": "cosine", "prediction": "v",
    "schedule": "ddpm", "timestep_sampling": "uniform", "max_train_timestep": None, "lr": 0.001,
    "weight_decay": 0.0, "ema_decay": 0.9, "image_shape": [16, 16], "image_spacing": [2.0, 2.0], "modality": "CT",
    "intensity_range": [-1000.0, 1000.0], "export_dir": None, "seed": 0,
    "_instantiator": "lightning.pytorch.cli.instantiate_module",
}
OLD_AUTOENCODER_HPARAMS = {
    "spatial_dims": 2, "channels": [16, 16], "latent_channels": 4, "num_res_blocks": 1, "attention_levels": None,
    "norm_num_groups": 16, "with_nonlocal_attn": False, "kl_weight": 1e-6, "adversarial_weight": 0.01,
    "adversarial_start": 0, "perceptual_weight": 0.0, "perceptual_weights": None, "discriminator_channels": 8,
    "discriminator_layers": 2, "lr": 1e-4, "discriminator_lr": 5e-4, "decode_tile": None, "image_shape": [32, 32],
    "image_spacing": None, "modality": "CT", "intensity_range": [-1000.0, 1000.0], "export_dir": None, "seed": 0,
}


def shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


def test_the_nested_signatures_stay_small():
    import inspect

    # DiffusionModule: the typed groups plus training-only arguments (16 with init_from, fine-tuning's start)
    for cls, most in ((DiffusionModule, 16), (AutoencoderModule, 15)):
        assert len(inspect.signature(cls.__init__).parameters) - 1 <= most


def test_an_old_flat_config_builds_the_network_of_the_rewritten_one():
    new_args = yaml.safe_load((CONFIGS / "smoke" / "ddpm_2d.yaml").read_text())["model"]["init_args"]
    assert is_flat(OLD_SMOKE_ARGS) and not is_flat(new_args)
    migrated = nested_arguments(OLD_SMOKE_ARGS)
    assert migrated["unet"]["channels"] == [16, 32] and migrated["image"]["shape"] == [32, 32]
    assert nested_arguments(migrated) == migrated  # nested arguments pass through
    old, new = DiffusionModule(**migrated), DiffusionModule(**new_args)
    assert shapes(old) == shapes(new)
    assert old.model_config() == new.model_config()
    assert DiffusionModule.from_flat(**OLD_SMOKE_ARGS).model_config() == new.model_config()


def test_an_old_checkpoint_exports_the_same_network_and_config(tmp_path):
    """An older checkpoint (flat hyper_parameters) still exports: same state_dict keys and shapes, and the
    exported folder (config.json + unet.safetensors) describes the schedule and image the old arguments gave."""
    from meddiff.cli.export import module_from_checkpoint
    from meddiff.model import DiffusionModel

    reference = DiffusionModule.from_flat(**{k: v for k, v in OLD_CHECKPOINT_HPARAMS.items() if k[0] != "_"})
    torch.save({"hyper_parameters": OLD_CHECKPOINT_HPARAMS, "state_dict": reference.state_dict(),
                "meddiff_module": "diffusion", "epoch": 0, "global_step": 1}, tmp_path / "old.ckpt")
    rebuilt = module_from_checkpoint(tmp_path / "old.ckpt")
    assert shapes(rebuilt) == shapes(reference)
    assert main(["export", str(tmp_path / "old.ckpt"), str(tmp_path / "model")]) == 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "unet.safetensors"]
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["schedule"] == {"num_train_timesteps": 500, "beta_schedule": "cosine", "prediction": "v",
                                  "kind": "ddpm", "timestep_sampling": "uniform", "beta_start": 0.0001,
                                  "beta_end": 0.02, "clip_sample": False, "timestep_spacing": None,
                                  "steps_offset": None, "set_alpha_to_one": None}
    assert config["image"] == {"shape": [16, 16], "spacing": [2.0, 2.0], "modality": "CT",
                               "intensity_range": [-1000.0, 1000.0]}
    assert config["unet"]["num_class_embeds"] == 3
    loaded = DiffusionModel.from_pretrained(tmp_path / "model")
    assert shapes(loaded.unet) == shapes(reference.unet)


def test_an_old_autoencoder_checkpoint_exports(tmp_path):
    reference = AutoencoderModule.from_flat(**OLD_AUTOENCODER_HPARAMS)
    assert reference.config.attention_levels == [False, False]
    torch.save({"hyper_parameters": OLD_AUTOENCODER_HPARAMS, "state_dict": reference.state_dict(),
                "meddiff_module": "autoencoder"}, tmp_path / "ae.ckpt")
    assert main(["export", str(tmp_path / "ae.ckpt"), str(tmp_path / "ae")]) == 0
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["autoencoder.safetensors", "config.json"]
    config = json.loads((tmp_path / "ae" / "config.json").read_text())
    assert config["image"]["intensity_range"] == [-1000.0, 1000.0] and config["autoencoder"]["channels"] == [16, 16]


def test_beta_start_and_end_from_a_config_reach_the_exported_model(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "smoke" / "ddpm_2d.yaml").read_text())
    config["model"]["init_args"]["schedule"].update(beta_start=0.0015, beta_end=0.0195,
                                                    beta_schedule="scaled_linear")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:  # LightningCLI parses the config (and the override) and prints it
        main(["fit", "--config", str(tmp_path / "c.yaml"), "--model.init_args.schedule.beta_end=0.012",
              "--print_config"])
    assert done.value.code in (0, None)
    parsed = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert parsed["schedule"]["beta_start"] == 0.0015 and parsed["schedule"]["beta_end"] == 0.012
    module = DiffusionModule(**parsed)
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(),
                  "meddiff_module": "diffusion"}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]["schedule"]["beta_end"] == 0.012
    assert main(["export", str(tmp_path / "last.ckpt"), str(tmp_path / "model")]) == 0
    schedule = json.loads((tmp_path / "model" / "config.json").read_text())["schedule"]
    assert (schedule["beta_start"], schedule["beta_end"], schedule["beta_schedule"]) == (0.0015, 0.012,
                                                                                          "scaled_linear")


def test_an_old_flat_key_in_a_config_names_its_new_key(tmp_path):
    from meddiff.cli.fit import check_config_files, config_error_line

    old = yaml.safe_load((CONFIGS / "smoke" / "ddpm_2d.yaml").read_text())
    old["model"]["init_args"] = OLD_SMOKE_ARGS
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    with pytest.raises(MeddiffError,
                       match=r"model\.init_args\.(\w+) is now model\.init_args\.unet\.\1 \(12 flat keys"):
        check_config_files([tmp_path / "old.yaml"])
    assert moved_key("schedule") == "schedule.kind" and moved_key("image_shape") == "image.shape"
    assert moved_key("lr") is None
    line = config_error_line('Parser key "model":\n  Problem with given class_path '
                             "'meddiff.training.DiffusionModule':\n    Option 'beta_end' is not accepted")
    assert "model.init_args.schedule.beta_end" in line and "\n" not in line


def test_a_bad_nested_value_is_one_line():
    with pytest.raises(MeddiffError, match="unet.channels"):
        DiffusionModule(unet={"channels": "many"}, image={"shape": [16, 16]})
    with pytest.raises(MeddiffError, match="schedule kind"):
        DiffusionModule(schedule={"kind": "bogus"})
