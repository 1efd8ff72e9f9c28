"""MAISI bundles: randomly initialised MAISI networks saved in the bundle's exact file and key layout load into a
meddiff folder, and generate what MAISI's own sampling loop makes from the same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from meddiff.cli.main import main
from meddiff.errors import MeddiffError
from meddiff.hub.maisi import load_maisi_bundle
from meddiff.model import load_model
from meddiff.pipelines import DiffusionPipeline

# configs/inference.json of the maisi_ct_generative bundle, networks shrunk to test size (same keys and references)
INFERENCE = {
    "imports": ["$import torch", "$import scripts"],
    "bundle_root": ".",
    "model_dir": "$@bundle_root + '/models'",
    "trained_autoencoder_path": "$@model_dir + '/autoencoder_epoch273.pt'",
    "trained_diffusion_path": "$@model_dir + '/input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt'",
    "trained_controlnet_path": "$@model_dir + '/controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt'",
    "label_dict_json": "$@bundle_root + '/configs/label_dict.json'",
    "body_region": ["abdomen"],
    "spatial_dims": 3, "image_channels": 1, "latent_channels": 4,
    "output_size_xy": 32, "output_size_z": 32,
    "output_size": ["@output_size_xy", "@output_size_xy", "@output_size_z"],
    "spacing_xy": 1.5, "spacing_z": 2.0, "spacing": ["@spacing_xy", "@spacing_xy", "@spacing_z"],
    "autoencoder_sliding_window_infer_size": [96, 96, 96],
    "autoencoder_def": {
        "_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@image_channels", "out_channels": "@image_channels",
        "latent_channels": "@latent_channels", "num_channels": [8, 16, 16], "num_res_blocks": [1, 1, 1],
        "norm_num_groups": 8, "norm_eps": 1e-06, "attention_levels": [False, False, False],
        "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "use_checkpointing": False,
        "use_convtranspose": False, "norm_float16": False, "num_splits": 2, "dim_split": 1},
    "diffusion_unet_def": {
        "_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi.DiffusionModelUNetMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "out_channels": "@latent_channels",
        "num_channels": [16, 32], "attention_levels": [False, True], "num_head_channels": [0, 16],
        "num_res_blocks": 1, "norm_num_groups": 8, "use_flash_attention": True,
        "include_top_region_index_input": True, "include_bottom_region_index_input": True,
        "include_spacing_input": True},
    "controlnet_def": {
        "_target_": "monai.apps.generation.maisi.networks.controlnet_maisi.ControlNetMaisi",
        "spatial_dims": "@spatial_dims", "in_channels": "@latent_channels", "num_channels": [16, 32],
        "attention_levels": [False, True], "num_head_channels": [0, 16], "num_res_blocks": 1, "norm_num_groups": 8,
        "use_flash_attention": True, "conditioning_embedding_in_channels": 8,
        "conditioning_embedding_num_channels": [8, 16, 16]},
    "noise_scheduler": {
        "_target_": "monai.networks.schedulers.ddpm.DDPMScheduler", "num_train_timesteps": 1000,
        "beta_start": 0.0015, "beta_end": 0.0195, "schedule": "scaled_linear_beta", "clip_sample": False},
}


def monai_networks():
    from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
    from monai.apps.generation.maisi.networks.controlnet_maisi import ControlNetMaisi
    from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi

    def args(key):
        resolved = {k: INFERENCE[v[1:]] if isinstance(v, str) and v.startswith("@") else v
                    for k, v in INFERENCE[key].items() if k != "_target_"}
        if "use_flash_attention" in resolved:
            resolved["use_flash_attention"] = False  # MAISI's classes refuse it without a GPU
        return resolved

    torch.manual_seed(0)
    autoencoder = AutoencoderKlMaisi(**args("autoencoder_def")).eval()
    unet = DiffusionModelUNetMaisi(**args("diffusion_unet_def")).eval()
    controlnet = ControlNetMaisi(**args("controlnet_def")).eval()
    with torch.no_grad():  # a released ControlNet is trained: non-zero output convolutions make it matter here
        for name, parameter in controlnet.named_parameters():
            if "zero" in name or "controlnet_" in name:
                parameter.normal_(0, 0.02)
    return autoencoder, unet, controlnet


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle folder laid out as maisi_ct_generative: configs/inference.json, label_dict.json, models/*.pt."""
    root = tmp_path_factory.mktemp("maisi_ct_generative")
    (root / "configs").mkdir()
    (root / "models").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(INFERENCE, indent=1))
    (root / "configs" / "label_dict.json").write_text(json.dumps({"background": 0, "liver": 1, "spleen": 3}))
    autoencoder, unet, controlnet = monai_networks()
    torch.save(autoencoder.state_dict(), root / "models" / "autoencoder_epoch273.pt")
    torch.save({"unet_state_dict": unet.state_dict(), "scale_factor": torch.tensor(1.7), "epoch": 3},
               root / "models" / "input_unet3d_data-all_steps1000size512ddpm_random_current_inputx_v1.pt")
    torch.save({"controlnet_state_dict": controlnet.state_dict(), "epoch": 3},
               root / "models" / "controlnet-20datasets-e20wl100fold0bc_noi_dia_fsize_current.pt")
    return root


def test_a_maisi_bundle_exports_to_a_meddiff_folder(bundle, tmp_path):
    out = tmp_path / "maisi"
    assert main(["export", str(bundle), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "autoencoder.safetensors", "config.json",
                                                     "controlnet.safetensors", "unet.safetensors"]
    config = load_model(out).config
    assert config.unet.family == "maisi" and config.autoencoder.scale_factor == pytest.approx(1.7)
    assert config.schedule.beta_start == 0.0015 and config.schedule.beta_schedule == "scaled_linear"
    assert config.region.top == [0, 0, 1, 0] and config.image.spacing == [1.5, 1.5, 2.0]
    assert config.controlnet.structures == {1: "liver", 3: "spleen"} and config.autoencoder.decode_tile == [24] * 3


def test_meddiff_generates_what_maisis_own_loop_makes(bundle, tmp_path):
    """MAISI's sampling loop (bundle scripts/sample.py: ControlNet residuals into the UNet with region and spacing
    inputs, then decoding latents / scale_factor, [0, 1] -> -1000..1000 HU), here with MAISI v2's rectified-flow
    scheduler, against meddiff's pipeline on the exported folder, from the same noise."""
    import shutil

    from monai.networks.schedulers import RFlowScheduler

    from meddiff.nets import label_bits

    rflow = tmp_path / "bundle"
    shutil.copytree(bundle, rflow)
    settings = {**INFERENCE, "noise_scheduler": {
        "_target_": "monai.networks.schedulers.rectified_flow.RFlowScheduler", "num_train_timesteps": 1000,
        "use_discrete_timesteps": True, "sample_method": "logit-normal"}}
    (rflow / "configs" / "inference.json").write_text(json.dumps(settings))
    autoencoder, unet, controlnet = monai_networks()
    labels = torch.zeros(1, 1, 32, 32, 32, dtype=torch.long)
    labels[:, :, 8:24, 8:20, 4:28] = 1
    labels[:, :, 20:30, 4:12, 10:20] = 3
    model = load_maisi_bundle(rflow)
    assert model.config.schedule.kind == "rflow"
    ours = DiffusionPipeline(model).sample([5], steps=4, labels=labels)
    scheduler = RFlowScheduler(1000)
    scheduler.set_timesteps(4)
    latents = torch.randn((1, 4, 8, 8, 8), generator=torch.Generator().manual_seed(5))
    cond = label_bits(labels, 8)
    top = torch.tensor([[0, 0, 1, 0]], dtype=torch.float32) * 1e2
    spacing = torch.tensor([[1.5, 1.5, 2.0]]) * 1e2
    nexts = torch.cat([scheduler.timesteps[1:], torch.tensor([0], dtype=scheduler.timesteps.dtype)])
    with torch.no_grad():
        for t, next_t in zip(scheduler.timesteps, nexts, strict=True):
            down, mid = controlnet(x=latents, timesteps=torch.Tensor((t,)), controlnet_cond=cond)
            velocity = unet(x=latents, timesteps=torch.Tensor((t,)), top_region_index_tensor=top,
                            bottom_region_index_tensor=top, spacing_tensor=spacing,
                            down_block_additional_residuals=down, mid_block_additional_residual=mid)
            latents, _ = scheduler.step(velocity, t, latents, next_t)
        image = autoencoder.decode_stage_2_outputs(latents / 1.7)
    torch.testing.assert_close(ours, image, atol=1e-4, rtol=1e-4)
    made = DiffusionPipeline(model).to_image(ours[0])
    hu = np.clip(image[0, 0].numpy() * 2000 - 1000, -1024, 3071)  # MAISI's HU mapping; generated CT is clipped
    np.testing.assert_allclose(made.array, hu, atol=0.5)


def test_a_bundle_with_missing_or_foreign_weights_is_refused(bundle, tmp_path):
    import shutil

    broken = tmp_path / "bundle"
    shutil.copytree(bundle, broken)
    (broken / "models" / "autoencoder_epoch273.pt").unlink()
    with pytest.raises(MeddiffError, match="autoencoder_epoch273.pt is missing"):
        load_maisi_bundle(broken)
    torch.save({"weights": torch.zeros(3)}, broken / "models" / "autoencoder_epoch273.pt")
    with pytest.raises(MeddiffError, match="autoencoder weights do not fit"):
        load_maisi_bundle(broken)
    (broken / "models" / "autoencoder_epoch273.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(broken), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
