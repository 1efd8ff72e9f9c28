"""Latent diffusion and rectified flow: MONAI references, the two-stage smoke recipe end to end, folder checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from test_training import CONFIGS, smoke_config

from meddiff.cli.main import main
from meddiff.diffusion import latent, objective
from meddiff.diffusion.schedulers import NoiseSchedule
from meddiff.errors import MeddiffError
from meddiff.model import DiffusionModel, ModelConfig, load_autoencoder, load_model
from meddiff.nets import build_autoencoder
from meddiff.pipelines import DiffusionPipeline

RFLOW = NoiseSchedule(prediction="v", kind="rflow")


def tiny_model(schedule: NoiseSchedule = RFLOW, autoencoder: dict | None = None) -> DiffusionModel:
    torch.manual_seed(0)
    channels = 4 if autoencoder else 1
    config = ModelConfig(
        unet={"channels": [16, 16], "attention_levels": [False, False], "num_head_channels": 16,
              "norm_num_groups": 16, "in_channels": channels, "out_channels": channels},
        schedule=schedule, image={"shape": [32, 32], "spacing": [2.0, 2.0], "modality": "CT",
                                  "intensity_range": (-1000.0, 1000.0)},
        autoencoder=autoencoder)
    return DiffusionModel(config).to("cpu")


def test_the_flow_line_is_monai_rflow_add_noise():
    from monai.networks.schedulers import RFlowScheduler

    x0, noise = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0.0, 250.5, 999.0])
    expected = RFlowScheduler(1000, use_discrete_timesteps=False).add_noise(x0, noise, t)
    xt, target = RFLOW.noised_and_target(x0, noise, t)
    torch.testing.assert_close(xt, expected)
    torch.testing.assert_close(target, x0 - noise)
    torch.testing.assert_close(objective.flow_noised(x0, noise, 1.0), noise)


def test_rectified_flow_sampling_equals_monai_loop_and_is_pinned():
    """The same network and noise through our loop and MONAI's documented RFlowScheduler loop agree."""
    from monai.networks.schedulers import RFlowScheduler

    model = tiny_model()
    pipeline = DiffusionPipeline(model)
    ours = pipeline.sample([3], steps=7)
    scheduler = RFlowScheduler(1000)
    scheduler.set_timesteps(7)
    x = torch.randn((1, 1, 32, 32), generator=torch.Generator().manual_seed(3))
    nexts = torch.cat([scheduler.timesteps[1:], torch.tensor([0], dtype=scheduler.timesteps.dtype)])
    with torch.no_grad():
        for t, next_t in zip(scheduler.timesteps, nexts, strict=True):
            v = model.unet(x, timesteps=torch.as_tensor(t).expand(1))
            x, _ = scheduler.step(v, t, x, next_t)
    torch.testing.assert_close(ours, x)
    assert float(ours.abs().sum()) == pytest.approx(821.18, abs=0.05)  # full-loop value pinned


def test_schedule_kind_decides_the_samplers():
    model = tiny_model()
    assert DiffusionPipeline(model).sample([0], steps=2).shape == (1, 1, 32, 32)  # default sampler: rflow
    with pytest.raises(MeddiffError, match="rectified flow: sample it with --scheduler rflow"):
        DiffusionPipeline(model).sample([0], steps=2, scheduler="ddim")
    with pytest.raises(MeddiffError, match="rflow samples rectified-flow models only"):
        NoiseSchedule().check_scheduler("rflow")
    with pytest.raises(MeddiffError, match="prediction must be v"):
        NoiseSchedule(kind="rflow")
    with pytest.raises(MeddiffError, match="rflow model"):
        DiffusionPipeline(model).denoise(__import__("meddiff").Image(np.random.rand(32, 32).astype(np.float32),
                                                                     np.eye(4)))
    draws = RFLOW.draw_timesteps(4096, torch.Generator().manual_seed(0), "cpu")
    assert 0 <= draws.min() and draws.max() < 1000 and not torch.equal(draws, draws.round())  # continuous
    logit = NoiseSchedule(prediction="v", kind="rflow", timestep_sampling="logit-normal")
    middle = logit.draw_timesteps(4096, torch.Generator().manual_seed(0), "cpu")
    assert ((middle > 250) & (middle < 750)).float().mean() > ((draws > 250) & (draws < 750)).float().mean() + 0.1


def test_large_latents_decode_in_tiles_no_larger_than_the_tile():
    torch.manual_seed(0)
    autoencoder = build_autoencoder(2, channels=[16, 16], attention_levels=[False, False], norm_num_groups=16).eval()
    seen = []
    decoder = autoencoder.decode

    def spy(z):
        seen.append(tuple(z.shape[2:]))
        return decoder(z)

    autoencoder.decode = spy
    z = torch.randn(1, 4, 24, 20)
    with torch.no_grad():
        whole = latent.decode(autoencoder, z, 0.5)
        assert seen == [(24, 20)] and whole.shape == (1, 1, 48, 40)
        torch.testing.assert_close(latent.decode(autoencoder, z, 0.5, tile=[32, 32]), whole)  # fits: one piece
        seen.clear()
        tiled = latent.decode(autoencoder, z, 0.5, tile=[8, 8])
    assert tiled.shape == whole.shape and len(seen) > 4 and set(seen) == {(8, 8)}


def test_latent_model_config_is_checked():
    autoencoder = {"channels": [16, 16], "attention_levels": [False, False], "norm_num_groups": 16}
    model = tiny_model(autoencoder=autoencoder)
    assert model.config.sample_shape() == [16, 16] and model.config.sample_shape([64, 48]) == [32, 24]
    with pytest.raises(ValueError, match="does not work on the autoencoder's latents"):
        ModelConfig(unet={"channels": [16, 16], "attention_levels": [False, False], "norm_num_groups": 16},
                    schedule=RFLOW, image={"shape": [32, 32]}, autoencoder=autoencoder)
    with pytest.raises(MeddiffError, match="multiple of 4"):  # the unet halves once, the autoencoder once
        DiffusionPipeline(model).sample([0], steps=2, shape=[34, 32])
    with pytest.raises(MeddiffError, match="latent model: it generates images but cannot inpaint"):
        DiffusionPipeline(model).inpaint(__import__("meddiff").Image(np.zeros((32, 32), np.float32), np.eye(4)),
                                         np.ones((32, 32), bool))


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """The 2D two-stage smoke recipe on the chest CT's lower training slab, through meddiff fit and export."""
    from meddiff.data.samples import write_samples

    root = tmp_path_factory.mktemp("latent")
    manifest = write_samples(root / "ct", names=["chest_ct_train_lower"])
    ae_config = smoke_config("ct_autoencoder_2d.yaml", root / "ae", manifest, max_steps=8, log_every_n_steps=1)
    settings = yaml.safe_load(ae_config.read_text())
    settings["model"]["init_args"].update(export_dir=str(root / "autoencoder"), adversarial_start=2)
    ae_config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(ae_config)]) == 0
    ldm_config = smoke_config("ct_latent_2d.yaml", root / "ldm", manifest, max_steps=4, log_every_n_steps=1)
    settings = yaml.safe_load(ldm_config.read_text())
    settings["model"]["init_args"]["autoencoder"] = settings["data"]["init_args"]["latents"] = str(root / "autoencoder")
    ldm_config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(ldm_config)]) == 0
    assert main(["export", str(root / "ldm" / "run" / "checkpoints" / "last.ckpt"), str(root / "model")]) == 0
    return root


def test_the_two_stage_recipe_trains_exports_and_generates_ct(latent_run, tmp_path):
    root = latent_run
    assert sorted(p.name for p in (root / "model").iterdir()) == ["autoencoder.safetensors", "config.json",
                                                                  "unet.safetensors"]
    model = load_model(root / "model")
    folder, autoencoder = load_autoencoder(root / "autoencoder")
    for name, tensor in autoencoder.state_dict().items():  # the first stage stayed frozen
        torch.testing.assert_close(model.autoencoder.state_dict()[name], tensor)
    assert model.config.schedule.kind == "rflow" and folder.image.modality == "CT"
    scale = model.config.autoencoder.scale_factor
    assert scale > 0 and scale != 1.0  # computed from the training latents
    out = tmp_path / "generated"
    assert main(["generate", "--model", str(root / "model"), "-n", "2", "--steps", "3", "-o", str(out)]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["provenance"]["scheduler"] for r in records] == ["rflow", "rflow"]
    from meddiff import load_image

    image = load_image(out / "sample_000000.nii.gz")
    assert image.array.shape == (32, 32) and image.spacing == pytest.approx((5.6, 5.6))
    assert np.isfinite(image.array).all() and image.array.std() > 0


def test_an_autoencoder_folder_is_not_a_generator_and_a_mismatched_one_is_refused(latent_run, tmp_path):
    from meddiff.training import DiffusionModule

    with pytest.raises(MeddiffError, match="holds an autoencoder only"):
        load_model(latent_run / "autoencoder")
    with pytest.raises(MeddiffError, match="does not fit it"):
        DiffusionModule.from_flat(spatial_dims=2, autoencoder=str(latent_run / "autoencoder"), image_shape=[33, 33])
    with pytest.raises(MeddiffError, match="generates only"):
        DiffusionModule.from_flat(autoencoder=str(latent_run / "autoencoder"), task="inpaint", concat_channels=2,
                                  concat_key="inpaint_condition")
    config = smoke_config("ct_latent_2d.yaml", tmp_path, latent_run / "ct" / "manifest.jsonl")
    assert main(["fit", "--config", str(config), "--model.init_args.autoencoder", str(tmp_path / "none")]) == 2


def test_cached_latents_are_the_encoded_slices_and_spare_the_encoder(latent_run):
    """The data module's cached latents equal encoding its image slices; training on them never runs the encoder
    and refuses latents of another autoencoder."""
    import torch.nn.functional as F

    from meddiff.data.datamodule import ManifestDataModule
    from meddiff.training import DiffusionModule

    options = {"manifest": str(latent_run / "ct" / "manifest.jsonl"), "spacing": [5.6, 5.6, 5.0],
               "slices_per_volume": 4, "batch_size": 4, "modalities": ["CT"]}
    batches = []
    for latents in (None, str(latent_run / "autoencoder")):
        data = ManifestDataModule(**options, latents=latents)
        data.datasets["val"] = __import__("monai").data.Dataset(data.items("train"), data.transforms(train=False))
        batches.append(next(iter(data._loader("val", shuffle=False))))
    images, cached = batches
    folder, autoencoder = load_autoencoder(latent_run / "autoencoder")
    factor, (height, width) = folder.autoencoder.downsample, images["image"].shape[-2:]
    padded = F.pad(images["image"], [0, -width % factor, 0, -height % factor], value=-1.0)
    torch.testing.assert_close(cached["image"], latent.encode(autoencoder, padded, 1.0), atol=1e-5, rtol=1e-4)
    assert cached["image"].shape[1] == 4 and "latent" not in images

    module = DiffusionModule.from_flat(
        spatial_dims=2, autoencoder=str(latent_run / "autoencoder"), image_shape=[32, 32],
        channels=[16, 32], attention_levels=[False, False], num_head_channels=16,
        norm_num_groups=16, schedule="rflow", prediction="v")
    module.autoencoder.encode = None  # cached latents must not need it
    module.latent_scale.fill_(2.0)
    torch.testing.assert_close(module.latents(cached, 2.0), cached["image"] * 2.0)
    patch = {**cached, "image": cached["image"][..., :16, :16]}  # the latent side of a 32-voxel training crop
    assert torch.isfinite(module.loss(patch, torch.Generator().manual_seed(0)))
    with pytest.raises(MeddiffError, match="another autoencoder"):
        module.latents({**cached, "latent": ["0" * 16] * len(cached["latent"])}, 1.0)
    with pytest.raises(MeddiffError, match="no augment"):
        ManifestDataModule(**options, latents=str(latent_run / "autoencoder"), augment=[lambda d: d])


def test_the_3d_two_stage_smoke_recipe_runs(tmp_path):
    from meddiff.data.samples import write_samples

    manifest = write_samples(tmp_path / "ct", names=["chest_ct_train_lower"])
    ae_config = smoke_config("ct_autoencoder_3d.yaml", tmp_path / "ae", manifest, max_steps=4)
    settings = yaml.safe_load(ae_config.read_text())
    settings["model"]["init_args"].update(export_dir=str(tmp_path / "autoencoder"), adversarial_start=1)
    ae_config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(ae_config)]) == 0
    ldm_config = smoke_config("ct_latent_3d.yaml", tmp_path / "ldm", manifest, max_steps=2)
    settings = yaml.safe_load(ldm_config.read_text())
    settings["model"]["init_args"]["autoencoder"] = str(tmp_path / "autoencoder")
    settings["data"]["init_args"]["latents"] = str(tmp_path / "autoencoder")
    ldm_config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(ldm_config)]) == 0
    assert main(["export", str(tmp_path / "ldm" / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "m")]) == 0
    (image,) = DiffusionPipeline.from_pretrained(tmp_path / "m").generate(1, steps=2, progress=False)
    assert image.array.shape == (32, 32, 32) and np.isfinite(image.array).all()


@pytest.mark.parametrize("name", ["ct_3d_autoencoder.yaml", "ct_autoencoder_2d.yaml", "smoke/ct_autoencoder_2d.yaml",
                                  "smoke/ct_autoencoder_3d.yaml"])
def test_autoencoder_configs_parse_and_build(name, capsys):
    from meddiff.training import AutoencoderModule

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: meddiff.training.AutoencoderModule" in capsys.readouterr().out
    config = yaml.safe_load((CONFIGS / name).read_text())
    module = AutoencoderModule(**config["model"]["init_args"])
    assert list(config["data"]["init_args"]["patch_size"]) != [] and module.config.downsample >= 2


@pytest.mark.parametrize("name, first_stage", [("ct_3d_latent.yaml", "ct_3d_autoencoder.yaml"),
                                               ("ct_latent_2d.yaml", "ct_autoencoder_2d.yaml"),
                                               ("smoke/ct_latent_2d.yaml", "smoke/ct_autoencoder_2d.yaml"),
                                               ("smoke/ct_latent_3d.yaml", "smoke/ct_autoencoder_3d.yaml")])
def test_latent_configs_parse_and_build_on_their_first_stage(name, first_stage, tmp_path, capsys):
    """Each latent config names the folder its autoencoder config writes, and builds on that autoencoder."""
    from meddiff.training import AutoencoderModule, DiffusionModule

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: meddiff.training.DiffusionModule" in capsys.readouterr().out
    stage_one = yaml.safe_load((CONFIGS / first_stage).read_text())["model"]["init_args"]
    config = yaml.safe_load((CONFIGS / name).read_text())
    args = config["model"]["init_args"]
    assert args["autoencoder"] == stage_one["export_dir"] == config["data"]["init_args"]["latents"]
    AutoencoderModule(**stage_one).save_pretrained(tmp_path / "autoencoder")
    module = DiffusionModule(**{**args, "autoencoder": str(tmp_path / "autoencoder")})
    assert module.model_config().sample_shape() == [side // module.autoencoder_folder.autoencoder.downsample
                                                    for side in args["image"]["shape"]]


def test_label_bits_encode_each_label_in_binary():
    from meddiff.nets import label_bits

    labels = torch.tensor([0, 1, 5, 118]).view(1, 1, 2, 2)
    bits = label_bits(labels, 7)
    assert bits.shape == (1, 7, 2, 2)
    decoded = (bits * (2 ** torch.arange(7)).view(1, 7, 1, 1)).sum(dim=1)
    assert decoded.long().flatten().tolist() == [0, 1, 5, 118]


@pytest.fixture(scope="module")
def controlnet_run(latent_run):
    """configs/smoke/ct_controlnet_2d.yaml on the latent smoke model, through meddiff fit and export."""
    root = latent_run
    config = smoke_config("ct_controlnet_2d.yaml", root / "cn", root / "ct" / "manifest.jsonl", max_steps=3)
    settings = yaml.safe_load(config.read_text())
    settings["model"]["init_args"].update(base=str(root / "model"), export_dir=str(root / "cn_model"),
                                          structures=str(root / "ct" / "chest_ct_structures.json"),
                                          structure_hu=str(root / "ct" / "chest_ct_structure_hu.json"))
    config.write_text(yaml.safe_dump(settings))
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["export", str(root / "cn" / "run" / "checkpoints" / "last.ckpt"), str(root / "cn_export")]) == 0
    return root


def test_a_fresh_controlnet_leaves_the_base_model_unchanged(latent_run):
    """MONAI's ControlNet adds zero-initialised residuals: before training, samples equal the base model's."""
    from meddiff.model import ModelConfig
    from meddiff.nets import build_controlnet

    base = load_model(latent_run / "model")
    config = ModelConfig.model_validate({**base.config.model_dump(mode="json"), "controlnet": {
        "conditioning_channels": 7, "conditioning_embedding_channels": [8, 16], "structures": {"1": "spleen"}}})
    controlnet = build_controlnet(config.unet.model_dump(), 7, [8, 16])
    from monai.networks.utils import copy_model_state

    copy_model_state(controlnet, base.unet.state_dict())
    model = DiffusionModel(config, {**base.networks, "controlnet": controlnet.eval()})
    labels = torch.randint(0, 100, (1, 1, 32, 32))
    torch.testing.assert_close(DiffusionPipeline(model).sample([4], steps=3, labels=labels),
                               DiffusionPipeline(base).sample([4], steps=3))


def test_the_controlnet_recipe_trains_exports_and_follows_a_label_map_on_its_grid(controlnet_run, tmp_path):
    from meddiff import load_image

    root = controlnet_run
    for folder in ("cn_model", "cn_export"):  # export_dir at the end of training, and meddiff export
        assert sorted(p.name for p in (root / folder).iterdir()) == [
            "autoencoder.safetensors", "config.json", "controlnet.safetensors", "unet.safetensors"]
    model = load_model(root / "cn_export")
    controlnet = model.config.controlnet
    assert controlnet.structures[5] == "liver" and controlnet.conditioning_channels == 8  # 7 digits, the HU rendering
    assert controlnet.structure_hu[0] < 0 < controlnet.structure_hu[5] and controlnet.structure_hu[10] < -700
    base = load_model(root / "model")
    for name, tensor in base.unet.state_dict().items():  # the base stayed frozen
        torch.testing.assert_close(model.unet.state_dict()[name], tensor)
    labels_path = root / "ct" / "chest_ct_train_lower_labels.nii.gz"
    source = load_image(labels_path)
    small = tmp_path / "labels.nii.gz"  # a few slices of the map keep the test fast
    from meddiff import Image
    from meddiff.io import save_image

    save_image(Image(source.array[:, :, 10:12], source.affine, None), small)
    out = tmp_path / "out"
    assert main(["generate", "--model", str(root / "cn_export"), "--condition", str(small), "-n", "2",
                 "--steps", "2", "-o", str(out)]) == 0
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[1])
    from meddiff.files import file_sha256

    assert record["provenance"]["condition"] == "labels.nii.gz"
    assert record["provenance"]["condition_sha256"] == file_sha256(small)
    made = load_image(out / "sample_000001.nii.gz")
    assert made.array.shape == (512, 512, 2) and np.allclose(made.affine, load_image(small).affine)
    assert made.modality == "CT" and np.isfinite(made.array).all()
    same = DiffusionPipeline(model).generate(1, steps=2, seed=1, labels=load_image(small), progress=False)[0]
    np.testing.assert_allclose(same.array, made.array, atol=1e-3)  # image 1 = base seed 1, however it is made


def test_a_dicom_seg_label_map_gives_ct_series_with_their_seg(controlnet_run, tmp_path):
    """`--condition` reads a DICOM SEG; `--format dcm` writes each sample as a CT series and the map it follows as a
    SEG of that series, with the structure names; both pass the standard's validator."""
    import shutil
    import subprocess

    import nibabel as nib

    from meddiff import Image, load_image
    from meddiff.io import save_image
    from meddiff.io.dicom_write import write_synthetic_dicom

    root = controlnet_run
    labels, ct = (load_image(root / "ct" / f"chest_ct_train_lower{suffix}.nii.gz") for suffix in ("_labels", ""))
    small = Image(labels.array[:, :, 10:12], labels.affine, None)
    save_image(small, tmp_path / "labels.nii.gz")
    write_synthetic_dicom(Image(ct.array[:, :, 10:12], ct.affine, "CT"), tmp_path / "series", "template")
    assert main(["convert", str(tmp_path / "labels.nii.gz"), str(tmp_path / "labels_seg.dcm"), "--format", "seg",
                 "--template", str(tmp_path / "series")]) == 0
    out = tmp_path / "out"
    assert main(["generate", "--model", str(root / "cn_export"), "--condition", str(tmp_path / "labels_seg.dcm"),
                 "-n", "1", "--steps", "2", "--format", "dcm", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "sample_000000", "sample_000000_labels.dcm"]

    def canonical(image):
        return nib.as_closest_canonical(nib.Nifti1Image(image.array, image.affine)).get_fdata()

    for seg in (tmp_path / "labels_seg.dcm", out / "sample_000000_labels.dcm"):
        assert np.array_equal(canonical(load_image(seg)), canonical(small))
    import pydicom

    names = {item.SegmentLabel for item in pydicom.dcmread(out / "sample_000000_labels.dcm").SegmentSequence}
    assert {"liver", "aorta"} <= names
    if shutil.which("dciodvfy"):
        for path in (out / "sample_000000_labels.dcm", out / "sample_000000" / "slice_0000.dcm"):
            report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            assert "Error" not in report.stdout + report.stderr, path


def test_label_maps_are_checked(controlnet_run, tmp_path):
    from meddiff import Image

    pipeline = DiffusionPipeline(load_model(controlnet_run / "cn_export"))
    eye = np.eye(4)
    with pytest.raises(MeddiffError, match="not whole numbers"):
        pipeline.generate(1, labels=Image(np.full((32, 32), 0.5, np.float32), eye), progress=False)
    with pytest.raises(MeddiffError, match="labels -1 to -1; this model knows 0 to 127"):
        pipeline.generate(1, labels=Image(-np.ones((32, 32), np.float32), eye), progress=False)
    with pytest.raises(MeddiffError, match="conditioned on a label map"):
        pipeline.generate(1, progress=False)
    with pytest.raises(MeddiffError, match="takes no label map"):
        DiffusionPipeline(load_model(controlnet_run / "model")).generate(
            1, labels=Image(np.zeros((32, 32), np.float32), eye), progress=False)
    assert main(["generate", "--model", str(controlnet_run / "cn_export"), "--condition", str(tmp_path / "no.nii.gz"),
                 "-n", "1", "-o", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_the_memory_check_of_a_label_map_counts_the_batch_that_runs(controlnet_run, monkeypatch):
    """20 slices in batches of 8 are 8 images per network call, not the 2 seeds that name the run's first and last."""
    import meddiff.pipelines.generate as generate
    from meddiff import Image

    pipeline = DiffusionPipeline(load_model(controlnet_run / "cn_export"))
    labels = Image(np.zeros((32, 32, 20), np.float32), np.eye(4))
    from meddiff.pipelines.controlnet import plan

    shape = plan(pipeline.model, labels).padded  # a slice on the model's grid
    one_image = int(np.prod(shape)) * pipeline.config.autoencoder.channels[0] * 4  # its first level, float32
    monkeypatch.setattr(generate, "physical_memory", lambda: 4 * one_image)
    with pytest.raises(MeddiffError, match="a batch of 8 images"):
        pipeline.generate(1, labels=labels, batch_size=8, steps=1, progress=False)
    assert len(pipeline.generate(1, labels=labels, batch_size=2, steps=1, progress=False)) == 1


def test_drrs_of_the_training_slabs_make_a_radiograph_set_that_trains(tmp_path):
    """meddiff manifest drr: Beer-Lambert projections of the chest CT's training slabs only, a radiograph's
    contrast (bone and soft tissue above lung, lung above air), and the DRR smoke config trains on them."""
    from meddiff import load_image
    from meddiff.data.drr import Pose, render
    from meddiff.data.samples import chest_ct_slab

    assert main(["manifest", "drr", "-o", str(tmp_path / "drr"), "--per-slab", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "drr" / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all("chest_ct_train" in r["source"] for r in records)
    image = load_image(tmp_path / "drr" / records[2]["image"])
    assert image.array.shape == (512, 61) and image.spacing == pytest.approx((0.703125, 2.5))
    ct = chest_ct_slab(72, 133)()
    straight = render(ct, Pose(photons=1e9)).array
    spine, lung, air = straight[250:262, 30].mean(), straight[150:170, 30].mean(), straight[5:15, 30].mean()
    assert spine > lung > air >= 0  # the spine and mediastinum attenuate most, lungs less, air nothing
    assert render(ct, Pose(exposure=1.1, photons=1e9)).array.mean() > straight.mean()
    config = smoke_config("cxr_drr_2d.yaml", tmp_path, tmp_path / "drr" / "manifest.jsonl", max_steps=3)
    assert main(["fit", "--config", str(config)]) == 0
    assert main(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt"), str(tmp_path / "m")]) == 0
    (made,) = DiffusionPipeline.from_pretrained(tmp_path / "m").generate(1, steps=2, progress=False)
    assert made.modality == "DX" and made.array.shape == (32, 32)


@pytest.mark.parametrize("name, stages", [("ct_controlnet_2d.yaml", ("ct_autoencoder_2d.yaml", "ct_latent_2d.yaml")),
                                          ("smoke/ct_controlnet_2d.yaml",
                                           ("smoke/ct_autoencoder_2d.yaml", "smoke/ct_latent_2d.yaml"))])
def test_controlnet_configs_parse_and_build_on_their_base(name, stages, tmp_path, capsys):
    """Each ControlNet config names the folder its base config writes, and builds on that base."""
    from meddiff.training import AutoencoderModule, ControlNetModule, DiffusionModule

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: meddiff.training.ControlNetModule" in capsys.readouterr().out
    first, second = (yaml.safe_load((CONFIGS / stage).read_text())["model"]["init_args"] for stage in stages)
    args = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]
    assert args["base"] == second["export_dir"] and second["autoencoder"] == first["export_dir"]
    AutoencoderModule(**first).save_pretrained(tmp_path / "autoencoder")
    DiffusionModule(**{**second, "autoencoder": str(tmp_path / "autoencoder")}).diffusion_model().save_pretrained(
        tmp_path / "base")
    (tmp_path / "structures.json").write_text(json.dumps({"1": "spleen", "118": "costal_cartilages"}))
    (tmp_path / "hu.json").write_text(json.dumps({"0": -54.0, "1": 175.0, "118": 93.0}))
    module = ControlNetModule(**{**args, "base": str(tmp_path / "base"),
                                 "structures": str(tmp_path / "structures.json"),
                                 "structure_hu": str(tmp_path / "hu.json")})
    assert module.control_config.conditioning_channels == 8 and module.control_config.label_channels == 7
    assert 2 ** (len(module.control_config.conditioning_embedding_channels) - 1) == (
        module.base_config.autoencoder.downsample)


def test_a_label_map_gives_the_same_anatomy_in_any_voxel_order(controlnet_run):
    """The map is used in the canonical voxel order the training transforms gave the network: the same physical
    map stored with its x axis reversed gives the same images, reversed the same way."""
    from meddiff import Image, load_image

    source = load_image(controlnet_run / "ct" / "chest_ct_train_lower_labels.nii.gz")
    labels = Image(source.array[:, :, 20:21], source.affine, None)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = labels.array.shape[0] - 1
    reversed_map = Image(labels.array[::-1].copy(), labels.affine @ flip, None)
    pipeline = DiffusionPipeline(load_model(controlnet_run / "cn_export"))
    same = pipeline.generate(1, steps=2, seed=3, labels=labels, progress=False)[0].array
    other = pipeline.generate(1, steps=2, seed=3, labels=reversed_map, progress=False)[0].array
    np.testing.assert_allclose(other[::-1], same, atol=1e-3)


def test_drrs_are_scored_in_torchxrayvision_feature_space_from_a_release_file(tmp_path):
    """meddiff evaluate --features xrv_densenet121 on two DRR sets (the lower and upper training slabs), with the
    weights as torchxrayvision releases them (a whole pickled model, read without running its code)."""
    import torchxrayvision as xrv

    assert main(["manifest", "drr", "-o", str(tmp_path / "drr"), "--per-slab", "3"]) == 0
    for slab in ("lower", "upper"):
        (tmp_path / slab).mkdir()
        for path in (tmp_path / "drr").glob(f"drr_chest_ct_train_{slab}_*.nii.gz"):
            path.rename(tmp_path / slab / path.name)
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(weights=None, num_classes=18), tmp_path / "xrv-densenet121-res224-all.pt")
    out = tmp_path / "scores.json"
    assert main(["evaluate", "--real", str(tmp_path / "lower"), "--fake", str(tmp_path / "upper"), "--features",
                 "xrv_densenet121", "--weights", str(tmp_path / "xrv-densenet121-res224-all.pt"), "--metrics", "fid",
                 "--cache", "none", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    fid = scores["views"]["2d"]["fid"]
    assert np.isfinite(fid) and fid > 0


def test_the_autoencoders_perceptual_term_reads_radimagenet_from_its_local_release_file(tmp_path):
    """perceptual_weight > 0: RadImageNet's ResNet-50 (here random weights in its release layout) scores the
    reconstruction; the network stays out of checkpoints; a missing file is one clear line."""
    from conftest import write_radimagenet_weights

    from meddiff.training import AutoencoderModule

    write_radimagenet_weights(tmp_path / "RadImageNet-ResNet50.pt")
    module = AutoencoderModule.from_flat(
        channels=[16, 16], norm_num_groups=16, image_shape=[64, 64], perceptual_weight=0.1,
        perceptual_weights=str(tmp_path / "RadImageNet-ResNet50.pt"))
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    assert float(module.perceptual(x, x)) == 0.0
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_()
    distance = module.perceptual(y, x)
    distance.backward()
    assert float(distance) > 0 and y.grad.abs().sum() > 0
    assert not any(key.startswith("perceptual") for key in module.state_dict())
    volume = torch.rand(1, 1, 32, 32, 4) * 2 - 1
    assert float(module.perceptual(volume, volume.flip(2))) > 0  # a 3D autoencoder: on its axial slices
    with pytest.raises(MeddiffError):
        AutoencoderModule.from_flat(perceptual_weight=0.1, perceptual_weights=str(tmp_path / "missing.pt"))
