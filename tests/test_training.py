"""Training through ``meddiff fit`` (LightningCLI): loss falls in 2D and 3D, exact resume, DDP, export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from meddiff.cli.main import main
from meddiff.pipelines import DiffusionPipeline

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MEDDIFF = str(Path(sys.executable).parent / "meddiff")


def smoke_config(name: str, tmp_path: Path, manifest: Path, wandb: bool = False, **trainer) -> Path:
    """The smoke config with every output under ``tmp_path`` and the manifest swapped in."""
    config = yaml.safe_load((CONFIGS / "smoke" / name).read_text())
    root = tmp_path / "run"
    config["trainer"]["default_root_dir"] = str(root)
    loggers = (
        config["trainer"]["logger"]
        if wandb
        else [logger for logger in config["trainer"]["logger"] if "CSV" in logger["class_path"]]
    )
    for logger in loggers:
        logger["init_args"]["save_dir"] = str(root)
    config["trainer"]["logger"] = loggers
    for callback in config["trainer"]["callbacks"]:
        if "ModelCheckpoint" in callback["class_path"]:
            callback["init_args"]["dirpath"] = str(root / "checkpoints")
    config["trainer"].update(trainer)
    config["data"]["init_args"]["manifest"] = str(manifest)
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def train_losses(tmp_path: Path) -> list[float]:
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    with open(metrics) as fh:
        return [float(row["train/loss"]) for row in csv.DictReader(fh) if row.get("train/loss")]


def test_2d_smoke_training_loss_falls_and_logs(samples_dir, tmp_path):
    config = smoke_config("ddpm_2d.yaml", tmp_path, samples_dir / "manifest.jsonl", wandb=True, log_every_n_steps=2)
    assert main(["fit", "--config", str(config)]) == 0
    losses = train_losses(tmp_path)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert list((tmp_path / "run").rglob("wandb/offline-run-*")), "WandbLogger runs offline by default"
    assert list((tmp_path / "run" / "samples").glob("step_*.png")), "sample grid written"


def test_3d_smoke_training_loss_falls(samples_dir, tmp_path):
    config = smoke_config("ddpm_3d.yaml", tmp_path, samples_dir / "manifest.jsonl")
    assert main(["fit", "--config", str(config)]) == 0
    losses = train_losses(tmp_path)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.fixture()
def single_slice_manifest(tmp_path) -> Path:
    """One 2D training image and no augmentation: every batch is the same, so runs can be compared."""
    rng = np.random.default_rng(0)
    image = np.zeros((32, 32), np.float32)
    image[8:24, 8:24] = 100 + rng.normal(0, 10, (16, 16))
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "slice.nii.gz")
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"image": "slice.nii.gz", "modality": "MR", "split": "train", "spacing": [1, 1]}) + "\n"
    )
    return tmp_path / "m.jsonl"


def run_fit(config: Path, *extra: str) -> None:
    args = ["fit", "--config", str(config), "--data.init_args.patch_size=null", "--data.init_args.spacing=null",
            "--data.init_args.batch_size=1", *extra]
    assert main(args) == 0


def test_resume_continues_exactly(single_slice_manifest, tmp_path):
    ckpt_every = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    straight = smoke_config("ddpm_2d.yaml", tmp_path / "a", single_slice_manifest, max_steps=6,
                            val_check_interval=None, check_val_every_n_epoch=1000)
    resumed = smoke_config("ddpm_2d.yaml", tmp_path / "b", single_slice_manifest, max_steps=3,
                           val_check_interval=None, check_val_every_n_epoch=1000)
    for cfg in (straight, resumed):
        config = yaml.safe_load(cfg.read_text())
        config["trainer"]["callbacks"] = [{
            **ckpt_every,
            "init_args": {
                "dirpath": str(cfg.parent / "run" / "checkpoints"), "every_n_train_steps": 3, "save_last": True
            },
        }]
        config["model"]["init_args"]["image"]["shape"] = [32, 32]
        cfg.write_text(yaml.safe_dump(config))
    run_fit(straight)
    run_fit(resumed)
    run_fit(resumed, "--trainer.max_steps=6", "--ckpt_path=last")
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():  # raw weights and EMA weights
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a and state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key]["exp_avg"], state_a[key]["exp_avg"], rtol=0, atol=1e-7)
        assert int(state_b[key]["step"]) == int(state_a[key]["step"]) == 6


def test_ddp_two_cpu_processes(single_slice_manifest, tmp_path):
    config = smoke_config("ddpm_2d.yaml", tmp_path, single_slice_manifest, max_steps=2,
                          val_check_interval=None, check_val_every_n_epoch=1000)
    result = subprocess.run(
        [MEDDIFF, "fit", "--config", str(config), "--trainer.devices=2", "--trainer.strategy=ddp",
         "--data.init_args.patch_size=null", "--data.init_args.spacing=null", "--data.init_args.batch_size=1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2


def test_an_inpainting_model_trains_exports_and_fills_through_the_cli(samples_dir, tmp_path):
    """configs/smoke/inpaint_2d.yaml: random masks as the condition; meddiff inpaint then uses the model itself."""
    from meddiff import Image, load_image, save_image

    config = smoke_config("inpaint_2d.yaml", tmp_path, samples_dir / "manifest.jsonl", max_steps=4)
    assert main(["fit", "--config", str(config)]) == 0
    out = tmp_path / "model"
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(out)]) == 0
    assert DiffusionPipeline.from_pretrained(out).config.task == "inpaint"
    image = load_image(samples_dir / "dipy_t1_coronal_slice.nii.gz")
    mask = np.zeros(image.array.shape, np.uint8)
    mask[100:140, 90:150] = 1
    save_image(Image(mask, image.affine), tmp_path / "mask.nii.gz")
    source = str(samples_dir / "dipy_t1_coronal_slice.nii.gz")
    assert main(["inpaint", "-i", source, "--mask", str(tmp_path / "mask.nii.gz"),
                 "-o", str(tmp_path / "filled.nii.gz"), "--model", str(out), "--steps", "4"]) == 0
    filled = load_image(tmp_path / "filled.nii.gz").array
    assert np.array_equal(filled[mask == 0], image.array[mask == 0]) and np.isfinite(filled).all()


def test_a_ct_inpainting_model_trains_on_the_chest_ct_in_hu_and_never_on_its_padding(tmp_path):
    """configs/smoke/ct_inpaint_2d.yaml on the chest CT's lower training slab with its label map: the condition
    is built (field of view, body, structure masks), the padding outside the field of view is out of the loss,
    and the exported model fills a CT in HU."""
    from meddiff import Image, load_image
    from meddiff.data.samples import write_samples

    manifest = write_samples(tmp_path / "ct", names=["chest_ct_train_lower"])
    config = smoke_config("ct_inpaint_2d.yaml", tmp_path, manifest, max_steps=4, log_every_n_steps=1)
    assert main(["fit", "--config", str(config)]) == 0
    assert np.isfinite(train_losses(tmp_path)).all()
    out = tmp_path / "model"
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(out)]) == 0
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert pipeline.config.task == "inpaint" and pipeline.config.image.modality == "CT"
    volume = load_image(tmp_path / "ct" / "chest_ct_train_lower.nii.gz")
    image = Image(volume.array[:, :, 20], volume.affine, "CT")
    fill = np.zeros(image.array.shape, bool)
    fill[200:260, 250:300] = True
    filled = pipeline.inpaint(image, fill, steps=3, progress=False)[0]
    assert np.array_equal(filled.array[~fill], image.array[~fill])
    assert np.array_equal(filled.array, np.round(filled.array)) and filled.array[fill].min() > -2048  # HU


def test_export_gives_a_pipeline_with_identical_samples(samples_dir, tmp_path):
    config = smoke_config("ddpm_2d.yaml", tmp_path, samples_dir / "manifest.jsonl", max_steps=4)
    assert main(["fit", "--config", str(config)]) == 0
    out = tmp_path / "model"
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "unet.safetensors"]
    pipeline = DiffusionPipeline.from_pretrained(out)
    first = pipeline.generate(2, steps=4, seed=7, progress=False)
    saved_again = pipeline.save_pretrained(tmp_path / "copy")
    second = DiffusionPipeline.from_pretrained(saved_again).generate(2, steps=4, seed=7, progress=False)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.array, b.array)
        assert a.spacing == (4.0, 4.0) and a.modality == "MR"
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(out)]) == 2  # not empty
    assert main(["export", str(tmp_path / "missing.ckpt"), str(tmp_path / "x")]) == 2


@pytest.mark.parametrize(
    "name",
    ["mri_t1_2d.yaml", "mri_denoise_2d.yaml", "mri_generator_2d.yaml",
     "ct_3d.yaml", "cxr_2d.yaml", "smoke/ddpm_2d.yaml", "smoke/ddpm_3d.yaml",
     "smoke/inpaint_2d.yaml", "mri_inpaint_2d.yaml", "ct_inpaint_2d.yaml", "mri_inpaint_3d.yaml",
     "smoke/ct_inpaint_2d.yaml", "smoke/inpaint_3d.yaml", "smoke/cxr_drr_2d.yaml"],
)
def test_every_config_parses_and_builds_its_model(name, capsys):
    """The real configs cannot train here (no data), but LightningCLI must accept every field
    (trainer, loggers, callbacks, augmentations) and the model and data module must construct."""
    import importlib

    with pytest.raises(SystemExit) as done:  # LightningCLI prints the parsed config and exits
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: meddiff.training.DiffusionModule" in capsys.readouterr().out
    config = yaml.safe_load((CONFIGS / name).read_text())
    model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
    conditioning = model_args.get("conditioning", {})
    if str(conditioning.get("text_encoder", "")).startswith("hf-hub:"):  # BiomedCLIP's files are not here
        model_args = {**model_args, "conditioning": {k: v for k, v in conditioning.items() if k != "text_encoder"}}
    transforms = ("augment", "conditions")  # as class_path mappings here; LightningCLI builds them
    for part, args in (("model", model_args), ("data", {k: v for k, v in data_args.items() if k not in transforms})):
        module_name, class_name = config[part]["class_path"].rsplit(".", 1)
        getattr(importlib.import_module(module_name), class_name)(**args)
    if config["data"]["class_path"].endswith("SliceArrayDataModule"):  # a bundled recipe: 2D slices or crops
        assert model_args["unet"]["spatial_dims"] == 2
        if data_args.get("crop"):
            assert list(model_args["image"]["shape"]) == [data_args["crop"]] * 2
        return
    assert model_args["unet"]["spatial_dims"] == data_args["spatial_dims"]
    assert list(model_args["image"]["shape"]) == list(data_args["patch_size"])


def test_init_from_starts_the_unet_and_its_ema_from_a_trained_model(tmp_path):
    """Fine-tuning: ``init_from`` loads a model folder's UNet into the module and its EMA; a UNet of another
    shape is refused in one line that names the difference."""
    from meddiff import MeddiffError
    from meddiff.training import DiffusionModule

    small = {"channels": [16, 32], "attention_levels": [False, False], "num_head_channels": 16,
             "norm_num_groups": 8}
    trained = DiffusionModule(unet=small, image={"shape": [16, 16]})
    with torch.no_grad():
        for p in trained.unet.parameters():
            p.add_(torch.randn_like(p))
    trained.ema.module.load_state_dict(trained.unet.state_dict())
    trained.diffusion_model().save_pretrained(tmp_path / "start")
    tuned = DiffusionModule(unet=small, image={"shape": [16, 16]}, init_from=str(tmp_path / "start"))
    fresh = DiffusionModule(unet=small, image={"shape": [16, 16]})
    for name, value in trained.unet.state_dict().items():
        assert torch.equal(tuned.unet.state_dict()[name], value)
        assert torch.equal(tuned.ema.module.state_dict()[name], value)
    assert not torch.equal(fresh.unet.state_dict()["conv_in.conv.weight"],
                           trained.unet.state_dict()["conv_in.conv.weight"])
    with pytest.raises(MeddiffError, match=r"init_from .*channels \[16, 32\] vs \[16, 16\]"):
        DiffusionModule(unet={**small, "channels": [16, 16]}, image={"shape": [16, 16]},
                        init_from=str(tmp_path / "start"))
