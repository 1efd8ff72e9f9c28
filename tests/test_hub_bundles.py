"""MONAI model-zoo generative bundles: randomly initialised networks saved in each bundle's own file, key and config
layout (channels shrunk where the config allows it) import into a meddiff folder and generate what the bundle's own
sampling loop, re-implemented here from its published scripts, makes from the same noise."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from meddiff.errors import MeddiffError
from meddiff.hub.bundle import load_bundle
from meddiff.pipelines import DiffusionPipeline

# configs/inference.yaml of mednist_ddpm (MIT licence), image_dim shrunk from 64
MEDNIST = {
    "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
    "bundle_root": ".", "model_dir": "$@bundle_root + '/models'", "ckpt_path": "$@model_dir + '/model.pt'",
    "image_dim": 8, "device": "$torch.device('cpu')",
    "network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, "in_channels": 1,
                    "out_channels": 1, "channels": [8, 16, 16], "attention_levels": [False, True, True],
                    "num_res_blocks": 1, "num_head_channels": 16, "norm_num_groups": 8},
    "network": "$@network_def.to(@device)",
    "load_state": "$@network.load_state_dict(torch.load(@ckpt_path, weights_only = True))",
    "scheduler": {"_target_": "monai.networks.schedulers.DDPMScheduler", "num_train_timesteps": 1000},
    "inferer": {"_target_": "monai.inferers.DiffusionInferer", "scheduler": "@scheduler"},
    "noise": "$torch.rand(1,1,@image_dim,@image_dim)",
    "sample": "$lambda x: @inferer.sample(input_noise=x, diffusion_model=@network, scheduler=@scheduler)",
}
MEDNIST_META = {"version": "1.0.1", "name": "MedNIST DDPM", "monai_version": "1.4.0",
                "intended_use": "This is suitable for research purposes only."}

# configs/inference.json of brats_mri_axial_slices_generative_diffusion (Apache-2.0), channels shrunk
BRATS_2D = {
    "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
    "bundle_root": ".", "model_dir": "$@bundle_root + '/models'", "output_dir": "$@bundle_root + '/output'",
    "device": "$torch.device('cpu')", "output_postfix": "$datetime.now().strftime('sample_%Y%m%d_%H%M%S')",
    "channel": 0, "spatial_dims": 2, "image_channels": 1, "latent_channels": 1,
    "latent_shape": ["@latent_channels", 8, 8],
    "autoencoder_def": {
        "_target_": "monai.networks.nets.autoencoderkl.AutoencoderKL", "spatial_dims": "@spatial_dims",
        "in_channels": "@image_channels", "out_channels": "@image_channels", "latent_channels": "@latent_channels",
        "channels": [8, 16, 16], "num_res_blocks": 2, "norm_num_groups": 8, "norm_eps": 1e-06,
        "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": True,
        "with_decoder_nonlocal_attn": True, "include_fc": False},
    "load_autoencoder_path": "$@bundle_root + '/models/model_autoencoder.pt'",
    "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@load_autoencoder_path))",
    "autoencoder": "$@autoencoder_def.to(@device)",
    "network_def": {
        "_target_": "monai.networks.nets.diffusion_model_unet.DiffusionModelUNet", "spatial_dims": "@spatial_dims",
        "in_channels": "@latent_channels", "out_channels": "@latent_channels", "channels": [8, 16, 16, 32],
        "attention_levels": [False, True, True, True], "num_head_channels": [0, 8, 8, 8], "num_res_blocks": 2,
        "norm_num_groups": 8, "include_fc": False, "use_combined_linear": False},
    "load_diffusion_path": "$@model_dir + '/model.pt'",
    "load_diffusion": "$@network_def.load_old_state_dict(torch.load(@load_diffusion_path))",
    "diffusion": "$@network_def.to(@device)",
    "noise_scheduler": {
        "_target_": "monai.networks.schedulers.ddim.DDIMScheduler", "_requires_": ["@load_diffusion",
                                                                                  "@load_autoencoder"],
        "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta",
        "clip_sample": False},
    "noise": "$torch.randn([1]+@latent_shape).to(@device)",
    "set_timesteps": "$@noise_scheduler.set_timesteps(num_inference_steps=50)",
    "inferer": {"_target_": "scripts.ldm_sampler.LDMSampler", "_requires_": "@set_timesteps"},
    "sample": "$@inferer.sampling_fn(@noise, @autoencoder, @diffusion, @noise_scheduler)",
}
BRATS_2D_META = {"version": "1.1.2", "name": "BraTS MRI axial slices latent diffusion generation",
                 "monai_version": "1.4.0", "image_classes": "Flair brain MRI axial slices with 1x1 mm voxel size"}

# configs/inference.json of brats_mri_generative_diffusion (3D), channels and latent shrunk
BRATS_3D = {
    **{k: v for k, v in BRATS_2D.items() if k not in ("latent_shape", "autoencoder_def", "network_def")},
    "spatial_dims": 3, "latent_channels": 8, "latent_shape": ["@latent_channels", 4, 4, 4],
    "autoencoder_def": {**BRATS_2D["autoencoder_def"], "with_encoder_nonlocal_attn": False,
                        "with_decoder_nonlocal_attn": False},
    "network_def": {**BRATS_2D["network_def"], "channels": [16, 16, 32], "attention_levels": [False, True, True],
                    "num_head_channels": [0, 8, 8]},
    "saver": {"_target_": "SaveImage", "output_dir": "@output_dir", "output_postfix": "@output_postfix"},
}
BRATS_3D_META = {"version": "1.1.2", "name": "BraTS MRI image latent diffusion generation",
                 "image_classes": "Flair brain MRI with 1.1x1.1x1.1 mm voxel size"}

APACHE = "Apache License\nVersion 2.0, January 2004\n"


def arguments(config: dict, key: str) -> dict:
    """A definition's arguments with its @references filled in (what MONAI's ConfigParser gives)."""
    return {k: config[v[1:]] if isinstance(v, str) and v.startswith("@") else v
            for k, v in config[key].items() if not k.startswith("_")}


def write_bundle(root, config: dict, meta: dict, licence: str, weights: dict, config_name="inference.json"):
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    text = json.dumps(config, indent=1)
    if config_name.endswith(".yaml"):
        import yaml

        text = yaml.safe_dump(config)
    (root / "configs" / config_name).write_text(text)
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "LICENSE").write_text(licence)
    for name, state in weights.items():
        torch.save(state, root / "models" / name)
    return root


def seeded(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():  # MONAI zero-initialises output convolutions: random weights everywhere make them matter
        for parameter in network.parameters():
            parameter.normal_(0, 0.05) if parameter.ndim > 1 else parameter.uniform_(-0.05, 0.05)
    return network.eval()


@pytest.fixture(scope="module")
def mednist(tmp_path_factory):
    unet = seeded(DiffusionModelUNet(**arguments(MEDNIST, "network_def")), 1)
    root = write_bundle(tmp_path_factory.mktemp("mednist_ddpm"), MEDNIST, MEDNIST_META, "MIT License\n",
                        {"model.pt": unet.state_dict()}, "inference.yaml")
    return root, unet


@pytest.fixture(scope="module", params=["2d", "3d"])
def brats(request, tmp_path_factory):
    config, meta = (BRATS_2D, BRATS_2D_META) if request.param == "2d" else (BRATS_3D, BRATS_3D_META)
    autoencoder = seeded(AutoencoderKL(**arguments(config, "autoencoder_def")), 2)
    unet = seeded(DiffusionModelUNet(**arguments(config, "network_def")), 3)
    root = write_bundle(tmp_path_factory.mktemp(f"brats_{request.param}"), config, meta, APACHE,
                        {"model_autoencoder.pt": autoencoder.state_dict(), "model.pt": unet.state_dict()})
    return root, autoencoder, unet, config


def test_mednist_ddpm_generates_what_monais_inferer_loop_makes(mednist):
    """mednist_ddpm samples with MONAI's DiffusionInferer: DDPM over all 1,000 steps, the model called with the
    timestep, then scheduler.step (clip_sample True, MONAI's default); here from the same seeded noise."""
    root, unet = mednist
    imported = load_bundle(root)
    config = imported.model.config
    assert config.schedule.clip_sample and config.schedule.beta_schedule == "linear"
    assert config.image.shape == [8, 8] and imported.sampling == {"scheduler": "ddpm", "steps": 1000}
    assert imported.licence == "MIT License" and "torch.rand" in imported.notes[0]
    ours = DiffusionPipeline(imported.model).sample([7], scheduler="ddpm", steps=1000)
    generator = torch.Generator().manual_seed(7)
    image = torch.randn((1, 1, 8, 8), generator=generator)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(image, timesteps=torch.Tensor((t,)), context=None)
            image, _ = scheduler.step(out, t, image, generator=generator)
    torch.testing.assert_close(ours, image, atol=1e-3, rtol=0)  # float rounding over 1,000 steps


def test_brats_latent_bundles_generate_what_their_ldm_sampler_makes(brats):
    """The BraTS bundles' scripts/ldm_sampler.py: DDIM (MONAI's) over 50 steps from noise of latent_shape, the UNet
    called with a long timestep, then the autoencoder's decode_stage_2_outputs without a scale factor."""
    root, autoencoder, unet, settings = brats
    imported = load_bundle(root)
    config = imported.model.config
    latent = settings["latent_shape"][1:]
    assert config.image.shape == [side * 4 for side in latent] and config.autoencoder.scale_factor == 1.0
    assert config.image.modality == "MR" and config.image.spacing == ([1.0, 1.0] if len(latent) == 2 else [1.1] * 3)
    assert imported.sampling == {"scheduler": "ddim", "steps": 50} and imported.licence == "Apache License"
    ours = DiffusionPipeline(imported.model).sample([3], scheduler="ddim", steps=50)
    scheduler = DDIMScheduler(**arguments(settings, "noise_scheduler"))
    scheduler.set_timesteps(num_inference_steps=50)
    image = torch.randn([1, settings["latent_channels"], *latent], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(image, timesteps=torch.Tensor((t,)).long(), context=None)
            image, _ = scheduler.step(out, t, image)
        sample = autoencoder.decode_stage_2_outputs(image)
    torch.testing.assert_close(ours, sample, atol=1e-4, rtol=1e-4)


def test_import_writes_a_model_folder_with_its_card_that_generate_samples(brats, tmp_path, capsys):
    """``meddiff import`` (and its alias ``export BUNDLE``) writes config.json, one safetensors per network and a
    card naming the source and its licence; ``meddiff generate`` then samples it as the bundle does."""
    import nibabel as nib
    from safetensors.torch import load_file

    from meddiff.cli.main import main

    root, _, _, settings = brats
    out = tmp_path / "brats"
    assert main(["import", str(root), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "autoencoder.safetensors", "config.json",
                                                     "unet.safetensors"]
    card = (out / "README.md").read_text()
    assert "Apache License" in card and root.name in card and "--scheduler ddim --steps 50" in card
    assert main(["export", str(root), str(tmp_path / "alias")]) == 0
    alias, first = load_file(tmp_path / "alias" / "unet.safetensors"), load_file(out / "unet.safetensors")
    assert alias.keys() == first.keys() and all(torch.equal(alias[k], first[k]) for k in first)
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(out), "-o", str(samples), "-n", "1", "--scheduler", "ddim",
                 "--steps", "3"]) == 0
    made = nib.load(next(samples.glob("*.nii.gz")))
    expected = [side * 4 for side in settings["latent_shape"][1:]]
    assert list(made.shape[: len(expected)]) == expected
    dicom = tmp_path / "dicom"  # the DICOM path: a derived, synthetic series
    assert main(["generate", "--model", str(out), "-o", str(dicom), "-n", "1", "--steps", "2", "--format", "dcm"]) == 0
    assert list(dicom.rglob("*.dcm"))
    assert main(["import", str(root), str(out)]) == 2  # an existing folder is kept without --overwrite
    assert "pass --overwrite" in capsys.readouterr().err


# configs/inference.json of brain_image_synthesis_latent_diffusion_model (UK Biobank; Apache-2.0), networks shrunk
BRAIN = {
    "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path"],
    "bundle_root": ".", "model_dir": "$@bundle_root + '/models'", "output_dir": "$@bundle_root + '/output'",
    "device": "$torch.device('cpu')", "out_file": "$datetime.now().strftime('sample_%H%M%S_%d%m%Y')",
    "load_old": 1, "gender": 0.0, "age": 0.1, "ventricular_vol": 0.2, "brain_vol": 0.4,
    "conditioning": "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).to(@device).unsqueeze(1)",
    "autoencoder_def": {
        "_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 3, "in_channels": 1, "out_channels": 1,
        "latent_channels": 3, "channels": [8, 8, 8, 8], "num_res_blocks": 2, "norm_num_groups": 8, "norm_eps": 1e-06,
        "attention_levels": [False, False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False},
    "network_def": {
        "_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 3, "in_channels": 7, "out_channels": 3,
        "channels": [16, 32, 32], "num_res_blocks": 2, "attention_levels": [False, True, True], "norm_num_groups": 8,
        "norm_eps": 1e-06, "resblock_updown": True, "num_head_channels": [0, 32, 32], "with_conditioning": True,
        "transformer_num_layers": 1, "cross_attention_dim": 4, "upcast_attention": True,
        "use_flash_attention": False},
    "load_autoencoder_func": "$@autoencoder_def.load_old_state_dict if bool(@load_old) else "
                             "@autoencoder_def.load_state_dict",
    "load_autoencoder": "$@load_autoencoder_func(torch.load(@model_dir + '/autoencoder.pt'))",
    "autoencoder": "$@autoencoder_def.to(@device)",
    "load_diffusion_func": "$@network_def.load_old_state_dict if bool(@load_old) else @network_def.load_state_dict",
    "load_diffusion": "$@load_diffusion_func(torch.load(@model_dir + '/model.pt'))",
    "diffusion": "$@network_def.to(@device)",
    "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", "_requires_": ["@load_diffusion",
                                                                                      "@load_autoencoder"],
                  "beta_start": 0.0015, "beta_end": 0.0205, "num_train_timesteps": 1000,
                  "schedule": "scaled_linear_beta", "clip_sample": False},
    "noise": "$torch.randn((1, 3, 4, 4, 4)).to(@device)",
    "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
    "sampler": {"_target_": "scripts.sampler.Sampler", "_requires_": "@set_timesteps"},
    "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @conditioning)",
    "saver": {"_target_": "SaveImage", "_requires_": "@create_output_dir", "output_dir": "@output_dir",
              "output_postfix": "@out_file"},
}
BRAIN_META = {"version": "1.0.0", "name": "Brain Imaging Generation with Latent Diffusion Models",
              "image_classes": "T1w head MRI with 1x1x1 mm voxel size",
              "network_data_format": {"inputs": {"image": {
                  "type": "tabular", "format": "conditioning", "num_channels": 4, "value_range": [0, 1],
                  "channel_def": {"0": "Gender", "1": "Age", "2": "Ventricular volume", "3": "Brain volume"}}}}}


def old_layout(state: dict) -> dict:
    """A MONAI state dict in the older GenerativeModels key layout, which MONAI's load_old_state_dict converts."""
    old = {}
    for key, value in state.items():
        if "transformer_blocks" in key and ".out_proj." in key:
            key = key.replace(".out_proj.", ".to_out.0.")
        elif ".attn.to_" in key:
            key = key.replace(".attn.to_", ".to_")
        elif ".attn.out_proj." in key:
            key = key.replace(".attn.out_proj.", ".proj_attn.")
        old[key.replace("postconv", "conv")] = value
    return old


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    autoencoder = seeded(AutoencoderKL(**arguments(BRAIN, "autoencoder_def")), 4)
    unet = seeded(DiffusionModelUNet(**arguments(BRAIN, "network_def")), 5)
    weights = {"autoencoder.pt": old_layout(autoencoder.state_dict()), "model.pt": old_layout(unet.state_dict())}
    assert set(weights["model.pt"]) != set(unet.state_dict())  # the conversion is exercised
    root = write_bundle(tmp_path_factory.mktemp("brain_image_synthesis_latent_diffusion_model"), BRAIN, BRAIN_META,
                        APACHE, weights)
    return root, autoencoder, unet


def test_the_brain_bundle_generates_what_its_sampler_makes_for_given_conditions(brain):
    """scripts/sampler.py of the brain bundle: the four conditions both as channels after the latent and as the
    cross-attention context (1, 1, 4), DDIM over 50 steps, decoded without a scale factor; checkpoints in the
    GenerativeModels layout (load_old 1). meddiff checks names and ranges and records every value it used."""
    root, autoencoder, unet = brain
    imported = load_bundle(root)
    config = imported.model.config
    assert config.scalars.names == ["gender", "age", "ventricular_vol", "brain_vol"]
    assert config.scalars.defaults == [0.0, 0.1, 0.2, 0.4] and config.scalars.ranges == [(0.0, 1.0)] * 4
    assert config.image.shape == [32, 32, 32] and config.unet.upcast_attention and config.unet.resblock_updown
    values = {"gender": 1.0, "age": 0.7, "brain_vol": 0.3}
    pipeline = DiffusionPipeline(imported.model)
    ours = pipeline.sample([11], scheduler="ddim", steps=50, condition_values=values)
    conditioning = torch.tensor([[1.0, 0.7, 0.2, 0.3]]).unsqueeze(1)
    scheduler = DDIMScheduler(**arguments(BRAIN, "scheduler"))
    scheduler.set_timesteps(num_inference_steps=50)
    image = torch.randn((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(11))
    cond_concat = conditioning.squeeze(1)[..., None, None, None].expand(1, 4, 4, 4, 4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(torch.cat((image, cond_concat), dim=1), timesteps=torch.Tensor((t,)).long(),
                       context=conditioning)
            image, _ = scheduler.step(out, t, image)
        sample = autoencoder.decode_stage_2_outputs(image)
    torch.testing.assert_close(ours, sample, atol=1e-4, rtol=1e-4)
    with pytest.raises(MeddiffError, match="age=1.5 is outside its range 0 to 1"):
        pipeline.sample([11], steps=2, condition_values={"age": 1.5})
    with pytest.raises(MeddiffError, match="no condition sex: its conditions are gender, age"):
        pipeline.sample([11], steps=2, condition_values={"sex": 1.0})


def test_generate_takes_condition_values_and_records_them(brain, tmp_path, capsys):
    from meddiff.cli.main import main

    root, *_ = brain
    out = tmp_path / "brain"
    assert main(["import", str(root), str(out)]) == 0
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(out), "-o", str(samples), "-n", "1", "--steps", "2",
                 "--condition-values", "gender=1, age=0.25"]) == 0
    record = json.loads((samples / "manifest.jsonl").read_text().splitlines()[0])
    assert json.dumps(record).count('"condition_values": {"gender": 1.0, "age": 0.25, "ventricular_vol": 0.2, '
                                    '"brain_vol": 0.4}') == 1
    assert main(["generate", "--model", str(out), "-o", str(tmp_path / "bad"), "-n", "1",
                 "--condition-values", "age"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def write_clip_text_model(folder, width: int = 32):
    """A tiny CLIP text model and tokenizer in Stable Diffusion's layout (``text_encoder/``, ``tokenizer/`` with
    vocab.json and merges.txt written here, since none can be downloaded)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *[c + "</w>" for c in letters], "ef", "ef</w>", "pl", "ur"]:
        vocab.setdefault(token, len(vocab))
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\ne f\ne f</w>\np l\nu r\n")
    tokenizer = CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                              model_max_length=16, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder / "tokenizer")
    torch.manual_seed(6)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                         bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    model.save_pretrained(folder / "text_encoder")
    return tokenizer, model


# configs/inference.json of cxr_image_synthesis_latent_diffusion_model (MIMIC-CXR; Apache-2.0), networks shrunk;
# scripts/sampler.py's sampling_fn signature (guidance_scale=7.0, scale_factor=0.3) is written beside it
CXR = {
    "imports": ["$import torch", "$from datetime import datetime", "$from pathlib import Path",
                "$from transformers import CLIPTextModel", "$from transformers import CLIPTokenizer"],
    "bundle_root": ".", "model_dir": "$@bundle_root + '/models'", "device": "$torch.device('cpu')",
    "load_old": 1, "prompt": "Big right-sided pleural effusion", "prompt_list": "$['', @prompt]",
    "guidance_scale": 7.0,
    "tokenizer": "$CLIPTokenizer.from_pretrained(\"stabilityai/stable-diffusion-2-1-base\", subfolder=\"tokenizer\")",
    "text_encoder": "$CLIPTextModel.from_pretrained(\"stabilityai/stable-diffusion-2-1-base\", "
                    "subfolder=\"text_encoder\")",
    "tokenized_prompt": "$@tokenizer(@prompt_list, padding=\"max_length\", max_length=@tokenizer.model_max_length, "
                        "truncation=True,return_tensors=\"pt\")",
    "prompt_embeds": "$@text_encoder(@tokenized_prompt.input_ids.squeeze(1))[0].to(@device)",
    "autoencoder_def": {
        "_target_": "monai.networks.nets.AutoencoderKL", "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
        "latent_channels": 3, "channels": [8, 8, 8, 8], "num_res_blocks": 2, "norm_num_groups": 8, "norm_eps": 1e-06,
        "attention_levels": [False, False, False, False], "with_encoder_nonlocal_attn": False,
        "with_decoder_nonlocal_attn": False},
    "load_autoencoder": "$@autoencoder_def.load_old_state_dict(torch.load(@model_dir + '/autoencoder.pt'))",
    "network_def": {
        "_target_": "monai.networks.nets.DiffusionModelUNet", "spatial_dims": 2, "in_channels": 3, "out_channels": 3,
        "channels": [16, 32, 32], "num_res_blocks": 2, "attention_levels": [False, True, True], "norm_num_groups": 8,
        "norm_eps": 1e-06, "resblock_updown": False, "num_head_channels": [0, 32, 32], "with_conditioning": True,
        "transformer_num_layers": 1, "cross_attention_dim": 32, "upcast_attention": True,
        "use_flash_attention": False},
    "load_diffusion": "$@network_def.load_old_state_dict(torch.load(@model_dir + '/model.pt'))",
    "scheduler": {"_target_": "monai.networks.schedulers.DDIMScheduler", "_requires_": ["@load_diffusion",
                                                                                      "@load_autoencoder"],
                  "beta_start": 0.0015, "beta_end": 0.0205, "num_train_timesteps": 1000,
                  "schedule": "scaled_linear_beta", "prediction_type": "v_prediction", "clip_sample": False},
    "noise": "$torch.randn((1, 3, 8, 8)).to(@device)",
    "set_timesteps": "$@scheduler.set_timesteps(num_inference_steps=50)",
    "sampler": {"_target_": "scripts.sampler.Sampler", "_requires_": "@set_timesteps"},
    "sample": "$@sampler.sampling_fn(@noise, @autoencoder, @diffusion, @scheduler, @prompt_embeds)",
}
CXR_META = {"version": "1.0.2", "name": "Chest X-ray Latent Diffusion Synthesis",
            "image_classes": "Radiography (X-ray) with 512 x 512 pixels"}
CXR_SAMPLER = '''class Sampler:
    @torch.no_grad()
    def sampling_fn(self, input_noise, autoencoder_model, diffusion_model, scheduler, prompt_embeds,
                    guidance_scale: float = 7.0, scale_factor: float = 0.3):
        ...
'''


def test_the_cxr_bundle_generates_what_its_guided_sampler_makes_for_a_prompt(tmp_path):
    """scripts/sampler.py of the CXR bundle: prompts ['', prompt] encoded by the CLIP text model padded to its
    length, v-prediction DDIM over 50 steps with guidance 7 (uncond + 7 (cond - uncond)), decoded from latents / 0.3;
    the scale factor and guidance come from the sampler's signature, the text encoder from --text-encoder."""
    from meddiff.cli.main import main

    tokenizer, text_model = write_clip_text_model(tmp_path / "sd21")
    autoencoder = seeded(AutoencoderKL(**arguments(CXR, "autoencoder_def")), 7)
    unet = seeded(DiffusionModelUNet(**arguments(CXR, "network_def")), 8)
    root = write_bundle(tmp_path / "cxr_image_synthesis_latent_diffusion_model", CXR, CXR_META, APACHE,
                        {"autoencoder.pt": old_layout(autoencoder.state_dict()),
                         "model.pt": old_layout(unet.state_dict())})
    (root / "scripts").mkdir()
    (root / "scripts" / "sampler.py").write_text(CXR_SAMPLER)
    assert main(["import", str(root), str(tmp_path / "refused")]) == 2  # the text encoder is not in the bundle
    out = tmp_path / "cxr"
    assert main(["import", str(root), str(out), "--text-encoder", str(tmp_path / "sd21")]) == 0
    assert {"text_encoder", "tokenizer", "README.md"} <= {p.name for p in out.iterdir()}
    assert "--guidance-scale 7 --prompt TEXT" in (out / "README.md").read_text()
    pipeline = DiffusionPipeline.from_pretrained(out)
    assert pipeline.model.config.autoencoder.scale_factor == pytest.approx(0.3)
    prompt = "pleural effusion"
    ours = pipeline.sample([2], prompts=[prompt], scheduler="ddim", steps=50, guidance_scale=7.0)
    ids = tokenizer(["", prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    scheduler = DDIMScheduler(**arguments(CXR, "scheduler"))
    scheduler.set_timesteps(num_inference_steps=50)
    noise = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        prompt_embeds = text_model(ids.squeeze(1))[0]
        for t in scheduler.timesteps:
            out_u, out_c = unet(torch.cat([noise] * 2), timesteps=torch.Tensor((t,)).long(),
                                context=prompt_embeds).chunk(2)
            noise, _ = scheduler.step(out_u + 7.0 * (out_c - out_u), t, noise)
        sample = autoencoder.decode_stage_2_outputs(noise / 0.3)
    torch.testing.assert_close(ours, sample, atol=1e-4, rtol=1e-4)
