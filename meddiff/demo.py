"""``make demo``: the whole path on bundled real MRI, in about a minute on a CPU.

Offline sample set -> manifest -> a tiny 2D diffusion model trained with ``meddiff fit`` (smoke
config) -> exported pipeline -> ``meddiff generate`` -> PNG grids of training data and samples.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from meddiff.cli.main import main as meddiff
from meddiff.data.datamodule import ManifestDataModule
from meddiff.data.samples import write_samples
from meddiff.errors import MeddiffError
from meddiff.io import load_image
from meddiff.viz import save_grid

SMOKE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smoke" / "ddpm_2d.yaml"


def run(*args: str) -> None:
    if meddiff(list(args)) != 0:
        raise SystemExit(f"demo step failed: meddiff {' '.join(args)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder (the demo replaces its own files there)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    os.environ.setdefault("WANDB_MODE", "offline")
    manifest = write_samples(out / "samples", overwrite=True)
    data = ManifestDataModule(str(manifest), spatial_dims=2, spacing=(4.0, 4.0, 4.0), patch_size=(32, 32), slices_per_volume=4, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    real_grid = save_grid([x[0].numpy() for x in batch["image"]], out / "training_batch.png", window=(-1.0, 1.0))

    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(out / "model", ignore_errors=True)
    shutil.rmtree(out / "synthetic", ignore_errors=True)
    run("fit", "--config", str(SMOKE_CONFIG), f"--data.init_args.manifest={manifest}", f"--trainer.default_root_dir={run_dir}",
        "--trainer.max_steps=60", "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run_dir}",
        "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={run_dir / 'checkpoints'}",
        "--trainer.callbacks.save_last=true", "--trainer.enable_progress_bar=false")
    run("export", str(run_dir / "checkpoints" / "last.ckpt"), str(out / "model"))
    run("generate", "--model", str(out / "model"), "-n", "16", "-o", str(out / "synthetic"), "--steps", "20", "--scheduler", "dpm++2m")
    synthetic = sorted((out / "synthetic").glob("sample_*.nii.gz"))
    if not synthetic:
        raise MeddiffError("the demo generated no images")
    sample_grid = save_grid([load_image(p).array for p in synthetic], out / "synthetic.png")
    print(f"sample set:      {manifest}")
    print(f"training batch:  {real_grid}")
    print(f"model:           {out / 'model'} (trained 60 steps on CPU: a smoke test, not a useful model)")
    print(f"synthetic:       {out / 'synthetic'} ({len(synthetic)} NIfTI + manifest.jsonl), grid {sample_grid}")


if __name__ == "__main__":
    main()
