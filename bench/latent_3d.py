"""Pixel versus latent diffusion in 3D on this machine: training step, sampling step and decoding time, and peak
memory, at 64^3 and 128^3 volumes, measured side by side in one run.

Pixel: a 3D UNet (channels 32/64/64, attention off) on the volume. Latent: the same UNet on the 4-channel
latents of a 3D AutoencoderKL (channels 32/64/64: 4x down-sampling per side, so 16^3 / 32^3), the training step
including the frozen encoder's pass, and one decoding per sample. Random weights (cost only), batch 1. Each
(space, size) runs in its own process, so its peak resident memory (ru_maxrss) is its own.

    OMP_NUM_THREADS=2 python -m bench.latent_3d --repeats 3 --out bench/results/latent_3d.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess

import torch

from bench import harness

UNET = {"spatial_dims": 3, "channels": [32, 64, 64], "attention_levels": [False, False, False],
        "num_res_blocks": 1, "norm_num_groups": 32}


def measure(space: str, size: int, repeats: int) -> dict:
    from meddiff.diffusion import latent
    from meddiff.nets import build_autoencoder, build_unet

    torch.manual_seed(0)
    latent_space = space == "latent"
    channels = 4 if latent_space else 1
    unet = build_unet(**UNET, in_channels=channels, out_channels=channels)
    autoencoder = build_autoencoder(3, channels=[32, 64, 64], latent_channels=4).eval() if latent_space else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    image = torch.randn(1, 1, size, size, size)
    side = size // 4 if latent_space else size

    def train_step() -> None:
        x0 = latent.encode(autoencoder, image, 1.0) if latent_space else image
        noise = torch.randn_like(x0)
        loss = torch.nn.functional.mse_loss(unet(x0 + noise, timesteps=torch.tensor([500])), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def sample_step() -> None:
        with torch.no_grad():
            unet(torch.randn(1, channels, side, side, side), timesteps=torch.tensor([500]))

    def decode() -> None:
        with torch.no_grad():
            latent.decode(autoencoder, torch.randn(1, 4, side, side, side), 1.0)

    def timed(function) -> float:
        return harness.timed(function, repeats, warmup=1)["median"]  # one warm-up call, then the median

    result = {"space": space, "size": size, "grid": side, "train_step_s": timed(train_step),
              "sample_step_s": timed(sample_step), "decode_s": timed(decode) if latent_space else 0.0}
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=None, repeats=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--one", nargs=2, metavar=("SPACE", "SIZE"), help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.repeats)))
        return
    rows = []
    for size in args.sizes:
        for space in ("pixel", "latent"):
            command = harness.module_command("latent_3d", "--one", space, str(size), "--repeats", str(args.repeats))
            out = subprocess.run(command, check=True, capture_output=True, text=True, env=harness.module_env()).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    ratios = []
    for size in args.sizes:
        pixel, lat = (next(r for r in rows if r["size"] == size and r["space"] == s) for s in ("pixel", "latent"))
        ratios.append({"size": size, "train_step_pixel_over_latent": pixel["train_step_s"] / lat["train_step_s"],
                       "sample_step_pixel_over_latent": pixel["sample_step_s"] / lat["sample_step_s"],
                       "peak_rss_pixel_over_latent": pixel["peak_rss_gib"] / lat["peak_rss_gib"]})
    result = {"rows": rows, "ratios": ratios, "threads": torch.get_num_threads(), "repeats": args.repeats}
    print(json.dumps(ratios, indent=1))
    if args.out:
        harness.write_result("latent_3d", args, result, args.out)


if __name__ == "__main__":
    harness.main(run, options)
