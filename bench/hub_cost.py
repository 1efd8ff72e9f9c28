"""The cost of the published generators meddiff imports, at their published sizes, on this machine.

Random weights in each source's published network configuration (the model-zoo bundles' ``inference.json``
arguments; a diffusers Stable Diffusion 1.x folder with its CLIP ViT-L text model) measure cost, not quality. Each
family runs in a process of its own (so its peak resident memory is its own) through meddiff's own path: the
source folder is written in its published layout, read by ``meddiff.hub`` and sampled by ``DiffusionPipeline``.
Time per sample at the published step count is computed from two measured runs (after a one-step warm-up), with
``k`` and ``2k`` steps:
per step = (t(2k) - t(k)) / k, the rest (noise, prompt encoding, decoding) = t(k) - k x per step.

    python -m bench.hub_cost --out bench/results/hub_cost.json [--families mednist brats2d ...] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import harness

# the published networks (Project-MONAI/model-zoo configs/inference.json; diffusers' UNet2DConditionModel and
# AutoencoderKL defaults, which are Stable Diffusion 1.x's), the sample's latent shape and the published sampler
FAMILIES = {
    "mednist": {"unet": dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[64, 128, 128],
                             attention_levels=[False, True, True], num_res_blocks=1, num_head_channels=128),
                "shape": [1, 64, 64], "scheduler": ("DDPMScheduler", 1000)},
    "brats2d": {"autoencoder": dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=1,
                                    channels=[64, 128, 256], num_res_blocks=2, norm_num_groups=32,
                                    attention_levels=[False, False, False], with_encoder_nonlocal_attn=True,
                                    with_decoder_nonlocal_attn=True, include_fc=False),
                "unet": dict(spatial_dims=2, in_channels=1, out_channels=1, channels=[32, 64, 128, 256],
                             attention_levels=[False, True, True, True], num_head_channels=[0, 32, 32, 32],
                             num_res_blocks=2, include_fc=False),
                "shape": [1, 64, 64], "scheduler": ("DDIMScheduler", 50)},
    "brats3d": {"autoencoder": dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8,
                                    channels=[64, 128, 256], num_res_blocks=2, norm_num_groups=32,
                                    attention_levels=[False, False, False], with_encoder_nonlocal_attn=False,
                                    with_decoder_nonlocal_attn=False, include_fc=False),
                "unet": dict(spatial_dims=3, in_channels=8, out_channels=8, channels=[256, 256, 512],
                             attention_levels=[False, True, True], num_head_channels=[0, 64, 64], num_res_blocks=2,
                             include_fc=False),
                "shape": [8, 36, 44, 28], "scheduler": ("DDIMScheduler", 50)},
    "brain": {"autoencoder": dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3,
                                  channels=[64, 128, 128, 128], num_res_blocks=2, norm_num_groups=32,
                                  attention_levels=[False, False, False, False], with_encoder_nonlocal_attn=False,
                                  with_decoder_nonlocal_attn=False),
              "unet": dict(spatial_dims=3, in_channels=7, out_channels=3, channels=[256, 512, 768], num_res_blocks=2,
                           attention_levels=[False, True, True], norm_num_groups=32, resblock_updown=True,
                           num_head_channels=[0, 512, 768], with_conditioning=True, transformer_num_layers=1,
                           cross_attention_dim=4, upcast_attention=True),
              "shape": [3, 20, 28, 20], "scheduler": ("DDIMScheduler", 50), "conditions": True},
    "cxr": {"autoencoder": dict(spatial_dims=2, in_channels=1, out_channels=1, latent_channels=3,
                                channels=[64, 128, 128, 128], num_res_blocks=2, norm_num_groups=32,
                                attention_levels=[False, False, False, False], with_encoder_nonlocal_attn=False,
                                with_decoder_nonlocal_attn=False),
            "unet": dict(spatial_dims=2, in_channels=3, out_channels=3, channels=[256, 512, 768], num_res_blocks=2,
                         attention_levels=[False, True, True], norm_num_groups=32, num_head_channels=[0, 512, 768],
                         with_conditioning=True, transformer_num_layers=1, cross_attention_dim=1024,
                         upcast_attention=True),
            "shape": [3, 64, 64], "scheduler": ("DDIMScheduler", 50), "text": 1024},
    "sd-diffusers": {"shape": [4, 64, 64], "text": 768},
}


def options():
    parser = harness.parser(__doc__, out=harness.results_file("hub_cost"))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--k", type=int, default=3, help="the shorter run's steps (the longer has twice as many)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one family may take (default: 1800)")
    parser.add_argument("--family", help=argparse.SUPPRESS)  # the child process's one family
    return parser


def clip_text_folder(folder: Path, width: int) -> None:
    """A CLIP text model of the published width (SD 2's OpenCLIP ViT-H text: 1024 wide, 23 layers; SD 1's CLIP
    ViT-L: 768, 12) and a small tokenizer (only the text model's cost is measured)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in [*letters, *[c + "</w>" for c in letters]]:
        vocab.setdefault(token, len(vocab))
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "tokenizer" / "vocab.json"), str(folder / "tokenizer" / "merges.txt"),
                  model_max_length=77, pad_token="<|endoftext|>").save_pretrained(folder / "tokenizer")
    layers, heads = (23, 16) if width == 1024 else (12, 12)
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
                                 num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                                 projection_dim=width)).save_pretrained(folder / "text_encoder")


def source_folder(name: str, root: Path) -> tuple[Path, dict]:
    """The family's source folder in its published layout, and the sampling arguments."""
    spec = FAMILIES[name]
    if name == "sd-diffusers":
        from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        clip_text_folder(root / "text", 768)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=512),
            text_encoder=CLIPTextModel.from_pretrained(root / "text" / "text_encoder"),
            tokenizer=CLIPTokenizer.from_pretrained(root / "text" / "tokenizer"),
            unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768),
            scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(root / "sd")
        return root / "sd", {"scheduler": "pndm", "steps": 50, "guidance_scale": 7.5, "prompts": ["effusion"]}
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

    bundle = root / name
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    config = {"network_def": {"_target_": "monai.networks.nets.DiffusionModelUNet", **spec["unet"]},
              "noise_scheduler": {"_target_": f"monai.networks.schedulers.{spec['scheduler'][0]}",
                                  "num_train_timesteps": 1000, "clip_sample": False},
              "latent_shape": spec["shape"], "load": "$torch.load(@bundle_root + '/models/model.pt')"}
    torch.save(DiffusionModelUNet(**spec["unet"]).state_dict(), bundle / "models" / "model.pt")
    if "autoencoder" in spec:
        config["autoencoder_def"] = {"_target_": "monai.networks.nets.AutoencoderKL", **spec["autoencoder"]}
        config["load_ae"] = "$torch.load(@bundle_root + '/models/autoencoder.pt')"
        torch.save(AutoencoderKL(**spec["autoencoder"]).state_dict(), bundle / "models" / "autoencoder.pt")
    meta = {}
    arguments = {"scheduler": spec["scheduler"][0][:4].lower(), "steps": spec["scheduler"][1]}
    if spec.get("conditions"):
        config.update(gender=0.0, age=0.1, ventricular_vol=0.2, brain_vol=0.4, conditioning=(
            "$torch.tensor([[@gender, @age, @ventricular_vol, @brain_vol]]).unsqueeze(1)"))
        meta = {"network_data_format": {"inputs": {"image": {"type": "tabular", "value_range": [0, 1]}}}}
    if spec.get("text"):
        clip_text_folder(root / "text", spec["text"])
        config["text_encoder"] = "$CLIPTextModel.from_pretrained('stabilityai/stable-diffusion-2-1-base')"
        arguments.update(guidance_scale=7.0, prompts=["effusion"])
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    return bundle, arguments


def measure(name: str, k: int) -> dict:
    """In this process: import the family, time k and 2k steps, and report the peak resident memory."""
    from meddiff.hub.imported import read_published
    from meddiff.pipelines import DiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:
        source, arguments = source_folder(name, Path(tmp))
        imported = read_published(source, text_encoder=Path(tmp) / "text" if name == "cxr" else None)
    pipeline = DiffusionPipeline(imported.model)
    steps = arguments.pop("steps")
    prompts = arguments.pop("prompts", None)
    pipeline.sample([0], prompts=prompts, steps=1, **arguments)  # warm-up: first calls allocate and pick kernels
    times = {}
    for n in (k, 2 * k):
        start = time.perf_counter()
        pipeline.sample([0], prompts=prompts, steps=n, **arguments)
        times[n] = time.perf_counter() - start
    per_step = (times[2 * k] - times[k]) / k
    rest = times[k] - k * per_step
    parameters = {part: round(sum(p.numel() for p in net.parameters()) / 1e6, 1)
                  for part, net in imported.model.networks.items()}
    return {"family": name, "parameters_millions": parameters, "image_shape": imported.model.config.image.shape,
            "published_steps": steps, "seconds_per_step": round(per_step, 3), "seconds_rest": round(rest, 2),
            "seconds_per_sample": round(rest + steps * per_step, 1),
            "measured_runs_seconds": {str(n): round(t, 2) for n, t in times.items()},
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def run(args) -> None:
    torch.set_num_threads(args.threads)
    if args.family:  # the child process: one family, its record on stdout
        print(json.dumps(measure(args.family, args.k)))
        return
    results = []
    for name in args.families:
        try:
            done = subprocess.run([sys.executable, "-m", "bench.hub_cost", "--family", name, "--k", str(args.k),
                                   "--threads", str(args.threads), "--out", "/dev/null"], capture_output=True,
                                  text=True, env=harness.module_env(), cwd=harness.ROOT, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results.append({"family": name, "error": f"did not finish within {args.timeout:g} s"})
            print(json.dumps(results[-1]), flush=True)
            continue
        if done.returncode != 0:
            results.append({"family": name, "error": done.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    harness.write_result("hub_cost", args, results, args.out)


if __name__ == "__main__":
    harness.main(run, options)
