"""Few-shot adaptation (issue 29): a finding the model never saw, learnt from K images by LoRA, textual inversion or
full fine-tuning.

The findings model trains on every attribute combination but two (``meddiff.data.findings.HELD_OUT``); this script
takes the first, a large hypointense lesion in the left anterior region, one lesion per image. K images of it,
rendered as the set renders its images (``target_images``), adapt the model: LoRA (``LoRAModule``, rank 4, UNet)
and full fine-tuning (``DiffusionModule`` from the model's weights) with the images' stated report, textual inversion
(``TextualInversionModule``) with the report "A <finding>." Each then generates ``--samples`` images for its prompt
(the report, or "A <finding>."; DPM-Solver++ 2M, guidance 4) and the analytic detector reads them: success is
count, intensity, size, side and region all as asked. The base model's row is the same prompt without adaptation.
Also: the adapter's size and training time, and memorisation of the K images: the median ratio of a generated image's
nearest K-image distance to its second nearest (near 1: no single image copied; under 1/3: a near-copy, Carlini et
al.) and the share of near-copies.

    python -m bench.adapt --model runs/findings_bench/model --clip runs/findings_bench/clip
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

from bench import harness
from bench.findings import judge, to_detector
from meddiff.data.datamodule import ManifestDataModule
from meddiff.data.findings import HELD_OUT, Finding, detect
from meddiff.data.manifest import Record, write_manifest
from meddiff.metrics.distribution import memorization
from meddiff.pipelines import DiffusionPipeline, load_pipeline
from meddiff.training import DiffusionModule, LoRAModule, TextualInversionModule
from meddiff.training.module import Conditioning

TARGET = Finding(1, *HELD_OUT[0])
PROMPT = "A large hypointense lesion in the left anterior region."
TOKEN_PROMPT = "A <finding>."


def target_images(count: int, folder: Path, seed: int) -> list[Path]:
    """``count`` images of the held-out finding, rendered as the findings set renders its images (a different
    template slice each, up to the 20 there are); the set itself holds only a handful, all in its test split."""
    from meddiff.data.findings import MM_PER_PIXEL, base_slices, render
    from meddiff.errors import MeddiffError
    from meddiff.image import Image
    from meddiff.io import save_image

    rng, bases, paths = np.random.default_rng(seed), base_slices(), []
    for i in range(count):
        image, tries = None, 0
        while image is None:
            try:
                image = render(bases[(i + tries) % len(bases)], TARGET, rng)
            except MeddiffError:  # no room for the lesion in that slice's quadrant: the next slice
                tries += 1
        paths.append(folder / f"target_{i:02d}.nii.gz")
        save_image(Image(image, np.diag([MM_PER_PIXEL] * 3 + [1.0]), "MR"), paths[-1])
    return paths


def k_manifest(paths: list[Path], k: int, report: str, folder: Path) -> Path:
    """A manifest of the first ``k`` target images (split train), each with ``report``."""
    records = [Record(image=str(p), modality="MR", split="train", report=report, spacing=[3.0, 3.0]) for p in paths[:k]]
    path = folder / f"k{k}_{'token' if '<' in report else 'report'}.jsonl"
    write_manifest(records, path, overwrite=True)
    return path


def fit(module: pl.LightningModule, manifest: Path, k: int, steps: int) -> float:
    data = ManifestDataModule(str(manifest), spatial_dims=2, patch_size=(72, 72), batch_size=min(k, 8),
                              num_workers=0)
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, data)
    return time.perf_counter() - start


def score(pipeline: DiffusionPipeline, prompt: str, samples: int, steps: int, train: np.ndarray) -> dict:
    images = []
    for start in range(0, samples, 16):
        seeds = list(range(start, min(samples, start + 16)))
        images.append(pipeline.sample(seeds, steps=steps, scheduler="dpm++2m", prompts=[prompt] * len(seeds),
                                      guidance_scale=4.0).cpu())
    images = torch.cat(images)
    found = [detect(to_detector(x)) for x in images]
    marks = [judge(TARGET, f) for f in found]
    fake = np.stack([to_detector(x).ravel() for x in images])
    copies = memorization(train, fake, threshold=1 / 3)
    return {"success": float(np.mean([all(m.values()) for m in marks])),
            "attribute_accuracy": {a: float(np.mean([m[a] for m in marks])) for a in marks[0]},
            "nn_ratio_median": float(np.median(copies.ratio)), "near_copies": copies.near_copy_fraction}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("adapt"), seed=0)
    parser.add_argument("--model", required=True, help="the report-conditioned findings model folder")
    parser.add_argument("--clip", required=True, help="its report encoder (meddiff's CLIP export)")
    parser.add_argument("--k", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--methods", nargs="+", default=["lora", "textual_inversion", "full"])
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15, help="sampling steps")
    return parser


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    base = load_pipeline(args.model)
    model_bytes = folder_bytes(Path(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        targets = target_images(max(args.k), tmp, args.seed)
        train_pixels = {k: np.stack([base_unit(p).ravel() for p in targets[:k]]) for k in args.k}
        rows = [{"method": "base", "k": 0, **score(base, PROMPT, args.samples, args.steps, train_pixels[max(args.k)])}]
        print(json.dumps(rows[-1]))
        for k in args.k:
            for method in args.methods:
                torch.manual_seed(args.seed)
                out = tmp / f"{method}_k{k}"
                if method == "full":
                    module = DiffusionModule(unet=base.config.unet, schedule=base.config.schedule,
                                             image=base.config.image, init_from=args.model, lr=1e-4,
                                             conditioning=Conditioning(text_encoder=args.clip, condition_dropout=0.1),
                                             ema_decay=0.99)
                    seconds = fit(module, k_manifest(targets, k, PROMPT, tmp), k, args.train_steps)
                    pipeline, size = DiffusionPipeline(module.diffusion_model()), model_bytes
                    prompt = PROMPT
                elif method == "lora":
                    module = LoRAModule(args.model, rank=4, lr=1e-3, export_dir=str(out))
                    seconds = fit(module, k_manifest(targets, k, PROMPT, tmp), k, args.train_steps)
                    pipeline, size, prompt = load_pipeline(args.model, adapter=out), folder_bytes(out), PROMPT
                else:
                    module = TextualInversionModule(args.model, token="<finding>", initializer="lesion", lr=5e-3,
                                                    conditioning=Conditioning(condition_dropout=0.0),
                                                    export_dir=str(out))
                    seconds = fit(module, k_manifest(targets, k, TOKEN_PROMPT, tmp), k, args.train_steps)
                    pipeline, size, prompt = load_pipeline(args.model, adapter=out), folder_bytes(out), TOKEN_PROMPT
                row = {"method": method, "k": k, "train_seconds": round(seconds, 1), "bytes": size,
                       **score(pipeline, prompt, args.samples, args.steps, train_pixels[k])}
                rows.append(row)
                print(json.dumps(row))
    harness.write_result("adapt", args, {"target": PROMPT, "model_bytes": model_bytes, "rows": rows}, args.out)
    print("| method | K | success | count | intensity | size | side | region | train s | size (bytes) | "
          "NN ratio | near-copies |")
    print("|---" * 12 + "|")
    for r in rows:
        acc = " | ".join(f"{100 * r['attribute_accuracy'][a]:.0f} %" for a in ("count", "intensity", "size", "side",
                                                                              "region"))
        print(f"| {r['method']} | {r['k']} | {100 * r['success']:.0f} % | {acc} | {r.get('train_seconds', '-')} | "
              f"{r.get('bytes', '-')} | {r['nn_ratio_median']:.2f} | {100 * r['near_copies']:.0f} % |")


def base_unit(path: Path) -> np.ndarray:
    """A findings image in its stored [0, 1]-ish units (what ``to_detector`` gives back for model samples)."""
    from meddiff.io import load_image

    return load_image(path).array.astype(np.float32)


if __name__ == "__main__":
    harness.main(run, options)
