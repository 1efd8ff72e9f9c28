"""``make demo``: the offline sample set, its manifest, and one training batch as a PNG grid.

This is the most useful end-to-end path that exists before the diffusion models land: real MRI
from installed packages -> manifest -> MONAI transforms -> the batches a 2D model trains on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meddiff.cli.info import describe
from meddiff.data.datamodule import ManifestDataModule
from meddiff.data.samples import write_samples
from meddiff.io import load_image
from meddiff.viz import save_grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="output folder (replaced files only inside it)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    manifest = write_samples(out / "samples", overwrite=True)
    data = ManifestDataModule(str(manifest), spatial_dims=2, patch_size=(128, 128), slices_per_volume=4, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    grid = save_grid([x[0].numpy() for x in batch["image"]], out / "training_batch.png", window=(-1.0, 1.0))
    held_out = load_image(out / "samples" / "dipy_t1_coronal_slice.nii.gz")
    stats = describe(held_out)["stats"]
    print(f"sample set:      {manifest} ({len(data.items('train'))} training volumes)")
    print(f"training batch:  {grid} ({tuple(batch['image'].shape)} in [-1, 1])")
    print(f"held-out slice:  {out / 'samples' / 'dipy_t1_coronal_slice.nii.gz'} (mean {stats['mean']:.1f}, max {stats['max']:.1f})")


if __name__ == "__main__":
    main()
