"""diffusers pipeline folders: a tiny Stable Diffusion pipeline saved by diffusers itself imports into a meddiff folder
whose images equal diffusers' own StableDiffusionPipeline for the same seed, prompt and guidance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_hub_bundles import write_clip_text_model

from meddiff.cli.main import main
from meddiff.hub.imported import read_published
from meddiff.pipelines import DiffusionPipeline

PROMPT = "pleural effusion"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd")
    tokenizer, text_model = write_clip_text_model(root / "parts")
    torch.manual_seed(9)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), latent_channels=4,
                        sample_size=16)
    with torch.no_grad():  # zero-initialised output layers would hide a wrong path
        for network in (unet, vae):
            for parameter in network.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_model, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    folder = root / "roentgen-like"
    pipe.save_pretrained(folder)
    return folder, pipe


def diffusers_image(pipe, seed: int, steps: int = 10, guidance: float = 7.5) -> torch.Tensor:
    return pipe(PROMPT, height=16, width=16, num_inference_steps=steps, guidance_scale=guidance,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


def test_a_diffusers_folder_generates_what_stable_diffusion_pipeline_makes(sd_folder):
    folder, pipe = sd_folder
    imported = read_published(folder)
    config = imported.model.config
    assert config.unet.family == "diffusers" and config.autoencoder.scale_factor == pytest.approx(0.18215)
    assert config.schedule.steps_offset == 1 and config.schedule.set_alpha_to_one is False
    assert imported.sampling == {"scheduler": "pndm", "steps": 50, "guidance_scale": 7.5}
    ours = DiffusionPipeline(imported.model).sample([4], prompts=[PROMPT], scheduler="pndm", steps=10,
                                                    guidance_scale=7.5)
    torch.testing.assert_close((ours / 2 + 0.5).clamp(0, 1), diffusers_image(pipe, 4), atol=1e-3, rtol=0)


def test_meddiff_generate_with_a_seed_gives_diffusers_image_for_that_seed(sd_folder, tmp_path):
    import nibabel as nib

    folder, pipe = sd_folder
    out = tmp_path / "model"
    assert main(["import", str(folder), str(out)]) == 0
    assert {"text_encoder", "tokenizer", "unet.safetensors", "autoencoder.safetensors"} <= {
        p.name for p in out.iterdir()}
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(out), "-o", str(samples), "-n", "1", "--seed", "12", "--prompt", PROMPT,
                 "--scheduler", "pndm", "--steps", "10", "--guidance-scale", "7.5"]) == 0
    made = np.asarray(nib.load(next(samples.glob("*.nii.gz"))).dataobj)
    # meddiff writes the decoded image unclipped and grayscale (the mean of its RGB channels): diffusers' latents for
    # that seed, decoded by its VAE, the same way
    latents = pipe(PROMPT, height=16, width=16, num_inference_steps=10, guidance_scale=7.5, output_type="latent",
                   generator=torch.Generator().manual_seed(12)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    reference = (decoded[0] / 2 + 0.5).mean(dim=0).numpy()
    np.testing.assert_allclose(made.squeeze(), reference, atol=1e-3)
    record = json.loads((samples / "manifest.jsonl").read_text().splitlines()[0])
    assert record["report"] == PROMPT and record["provenance"]["guidance_scale"] == 7.5


def test_the_text_encoder_is_part_of_the_weights_hash(sd_folder, tmp_path):
    """Provenance names the weights: a changed text encoder in an imported folder changes ``weights_sha256``."""
    from meddiff.model import load_model

    out = tmp_path / "model"
    assert main(["import", str(sd_folder[0]), str(out)]) == 0
    before = load_model(out).weights_sha256
    config = out / "text_encoder" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act"', '"_note": "edited", "hidden_act"'))
    assert load_model(out).weights_sha256 != before
