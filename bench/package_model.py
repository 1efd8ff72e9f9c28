"""Package a trained model folder as a bundled model: every network's weights in float16 (half the size; the
networks compute in float32 after loading) and ``config.json`` as trained. A mask-conditioned inpainting model
also gets ``inpaint_steps`` (``--steps``, 1 by default: the network's estimate of the posterior mean from pure
noise, chosen a priori because PSNR, SSIM and MSE reward the mean; no setting is tuned on any image).

    python -m bench.package_model runs/mri_inpaint/model --out meddiff/models/mri-inpaint --overwrite
    python -m bench.package_model runs/mri_t1_2d/model --out meddiff/models/mri-t1-2d --overwrite
"""

from __future__ import annotations

import argparse

from bench import harness
from meddiff.model import load_model


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED, out_help="the packaged model's folder")
    parser.add_argument("model", help="model folder written by a bench.train_* script or meddiff export")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--steps", type=int, default=1, help="an inpainting model's default steps")
    return parser


def run(args: argparse.Namespace) -> None:
    model = load_model(args.model)
    for network in model.networks.values():
        network.half()
    if model.config.task == "inpaint":
        model.config.inpaint_steps = args.steps
    print(f"wrote {model.save_pretrained(args.out, overwrite=args.overwrite)}")


if __name__ == "__main__":
    harness.main(run, options)
