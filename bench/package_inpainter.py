"""Package a trained inpainting model folder as a bundled model: weights in float16 (half the size; the UNet
computes in float32 after loading) and ``config.json`` as trained, with ``inpaint_steps`` (``--steps``, 1 by
default: the network's estimate of the posterior mean from pure noise, chosen a priori because PSNR, SSIM and
MSE reward the mean; no setting is tuned on any image).

    python bench/package_inpainter.py /work/runs/mri_inpaint/model --out meddiff/models/mri-inpaint --overwrite
"""

from __future__ import annotations

import argparse

from meddiff.errors import MeddiffError
from meddiff.model import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model folder written by bench/train_inpaint.py or meddiff export")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--steps", type=int, default=1, help="the model's default inpainting steps")
    args = parser.parse_args()
    model = load_model(args.model)
    if model.config.task != "inpaint":
        raise MeddiffError(f"{args.model} is not a mask-conditioned inpainting model (task {model.config.task})")
    model.unet.half()
    model.config.inpaint_steps = args.steps
    print(f"wrote {model.save_pretrained(args.out, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
