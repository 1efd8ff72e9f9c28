"""``meddiff evaluate``'s engine: image lists, cached features, metrics per view, a readable table."""

from __future__ import annotations

import contextlib
import logging
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from meddiff.errors import MeddiffError
from meddiff.files import atomic_path, file_sha256, full_suffix
from meddiff.io import READ_SUFFIXES, load_image
from meddiff.metrics.distribution import density_coverage, frechet_distance, memorization, precision_recall
from meddiff.metrics.features import Extractor
from meddiff.metrics.paired import paired

METRICS = ("fid", "prdc", "memorization", "paired", "frd", "clip")
NO_FEATURES = ("paired", "frd", "clip")  # metrics that need no feature extractor

logger = logging.getLogger(__name__)


def check_metrics(metrics: Sequence[str]) -> None:
    """One-line error for metric names meddiff does not know, or none at all (before any model or image is loaded)."""
    if not metrics:
        raise MeddiffError(f"no metrics named — pass --metrics with one or more of: {', '.join(METRICS)}")
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise MeddiffError(f"unknown metrics {sorted(unknown)} — available: {', '.join(METRICS)}")


def check_k(k: int) -> None:
    """Nearest neighbours for precision/recall: a positive count."""
    if k < 1:
        raise MeddiffError(f"-k {k}: the number of nearest neighbours must be 1 or more (default 3)")


def image_paths(source: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Images of a manifest (optionally one split), of a folder's manifest.jsonl, or of a folder's image files."""
    from meddiff.data.manifest import Manifest

    source = Path(source)
    if source.is_dir() and (source / "manifest.jsonl").is_file():
        source = source / "manifest.jsonl"
    if source.is_file() and full_suffix(source) in (".jsonl", ".json"):
        manifest = Manifest.read(source)
        records = manifest.split(split) if split else manifest.records
        paths = [manifest.resolve(r.image) for r in records]
    elif source.is_dir():
        if split:
            raise MeddiffError(f"{source} is a folder without a manifest: it has no splits (drop --real-split)")
        # hidden names are skipped: meddiff's temporaries (atomic_path) left by a killed writer are not images
        paths = sorted(p for p in source.iterdir()
                       if p.is_file() and full_suffix(p) in READ_SUFFIXES and not p.name.startswith("."))
    else:
        raise MeddiffError(f"{source} is neither a manifest nor a folder of images")
    if not paths:
        raise MeddiffError(f"{source} holds no images{f' in split {split!r}' if split else ''}")
    return paths


def image_reports(source: str | os.PathLike) -> dict[Path, str]:
    """Each image's report, from a manifest (or a folder's manifest.jsonl): what CLIP score compares it with."""
    from meddiff.data.manifest import Manifest

    source = Path(source)
    if source.is_dir() and (source / "manifest.jsonl").is_file():
        source = source / "manifest.jsonl"
    if not (source.is_file() and full_suffix(source) in (".jsonl", ".json")):
        raise MeddiffError("CLIP score needs the fake images' reports: give --fake as a manifest whose records carry "
                           f"'report' ({source} has none)")
    manifest = Manifest.read(source)
    return {manifest.resolve(r.image): r.report for r in manifest.records if r.report is not None}


def clip_score_of(fake: list[Path], reports: dict[Path, str], encoder, plane: str | None = None,
                  batch: int = 32) -> dict:
    """CLIP score of generated images against their reports (2D images; the middle ``plane`` slice of volumes)."""
    from meddiff.data.transforms import slice_axis
    from meddiff.metrics.text_image import clip_score

    missing = [p for p in fake if p not in reports]
    if missing:
        raise MeddiffError(f"CLIP score needs a report for every fake image: {missing[0]} has none in the manifest")
    scores = []
    for start in tqdm(range(0, len(fake), batch), desc=f"clip ({encoder.spec})", unit="batch"):
        images = []
        for path in fake[start : start + batch]:
            image = load_image(path)
            array = np.asarray(image.array).squeeze()
            if array.ndim == 3:
                if plane in (None, "all"):
                    raise MeddiffError(f"CLIP score compares 2D images with reports; {path.name} is a volume: "
                                       "pass --plane axial|coronal|sagittal to use its middle slice")
                axis = slice_axis(image.affine, plane)
                array = np.take(array, array.shape[axis] // 2, axis=axis)
            images.append(array)
        scores += clip_score(images, [reports[p] for p in fake[start : start + batch]], encoder)["per_item"]
    return {"clip_score": float(np.mean(scores)), "encoder": encoder.spec, "images": len(scores)}


def cached_features(paths: list[Path], extractor: Extractor, cache_dir: Path | None,
                    desc: str) -> list[dict[str, np.ndarray]]:
    """Features of each image, read from / written to ``cache_dir/<extractor id>/<file sha256>.npz``."""
    out = []
    for path in tqdm(paths, desc=f"{desc} ({extractor.name})", unit="image"):
        cache = cache_dir / extractor.identity / f"{file_sha256(path)}.npz" if cache_dir else None
        if cache is not None and cache.is_file():
            stored = _read_cached(cache)
            if stored is not None:
                out.append(stored)
                continue
        features = extractor.features(load_image(path))
        if cache is not None:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(cache, overwrite=True) as tmp, open(tmp, "wb") as fh:
                    np.savez(fh, **features)
            except OSError as exc:  # a cache is a convenience: a read-only or full disk does not stop the evaluation
                logger.warning("cannot write the feature cache under %s (%s): "
                               "going on without it (--cache none to skip it)", cache_dir, exc.strerror or exc)
                cache_dir = None
        out.append(features)
    return out


def _read_cached(cache: Path) -> dict[str, np.ndarray] | None:
    """A cache entry's features; None (with a warning naming the file, which is removed) when it cannot be read."""
    try:
        with np.load(cache) as stored:  # allow_pickle stays False: a cache file never runs code
            features = {k: stored[k] for k in stored.files}
        if not features:
            raise ValueError("no features in it")
        return features
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        logger.warning("feature cache entry %s is unreadable (%s: %s): removed, its features are computed again", cache,
                       type(exc).__name__, exc)
        with contextlib.suppress(OSError):  # a read-only cache: the entry is recomputed each time, as the warning says
            cache.unlink()
        return None


def as_slices(features: list[dict[str, np.ndarray]], plane: str) -> list[dict[str, np.ndarray]]:
    """Volumes' plane views as one '2d' view (``plane`` one of the planes, or 'all'), to compare with 2D images."""
    out = []
    for f in features:
        if "2d" in f or "3d" in f:
            out.append(f)
        else:
            out.append({"2d": np.concatenate([f[v] for v in sorted(f)]) if plane == "all" else f[plane]})
    return out


def _stack(features: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    views = sorted(set.intersection(*(set(f) for f in features)))
    return {view: np.concatenate([f[view] for f in features]) for view in views}


def evaluate(
    real: list[Path],
    fake: list[Path],
    extractor: Extractor | None,
    metrics: list[str],
    train: list[Path] | None = None,
    cache_dir: Path | None = None,
    k: int = 3,
    plane: str | None = None,
    clip=None,
    reports: dict[Path, str] | None = None,
) -> dict:
    """Metrics of ``fake`` against ``real``: per view (2d, or the three planes, or 3d) and their mean.

    ``plane`` (a plane name or 'all') turns volumes into slices of that plane, so generated 2D slices
    can be compared with real volumes. ``clip`` (an image-text encoder, e.g. BiomedCLIP) and
    ``reports`` (each fake image's report) give the ``clip`` metric.
    """
    check_metrics(metrics)
    check_k(k)
    results: dict = {"real": len(real), "fake": len(fake)}
    feature_metrics = [m for m in metrics if m not in NO_FEATURES]
    if feature_metrics:
        if extractor is None:
            raise MeddiffError(f"{', '.join(feature_metrics)} need a feature extractor (--features NAME)")
        results["features"] = extractor.name
        real_list, fake_list = (cached_features(real, extractor, cache_dir, "real"),
                                cached_features(fake, extractor, cache_dir, "fake"))
        train_list = (cached_features(train, extractor, cache_dir, "train") if train and "memorization" in metrics
                      else real_list)
        if plane is not None:
            real_list, fake_list, train_list = (as_slices(f, plane) for f in (real_list, fake_list, train_list))
        real_f, fake_f, train_f = _stack(real_list), _stack(fake_list), _stack(train_list)
        train_counts, fake_counts = _counts(train_list), _counts(fake_list)
        views = sorted(set(real_f) & set(fake_f))
        if not views:
            raise MeddiffError("the real and fake images give no common view: for 2D images against volumes, "
                               "pass --plane axial|coronal|sagittal|all")
        per_view = {}
        for view in views:
            r, f = real_f[view], fake_f[view]
            row: dict = {}
            if "fid" in metrics:
                row["fid"] = frechet_distance(r, f)
            if "prdc" in metrics:
                row.update(precision_recall(r, f, k))
                row.update(density_coverage(r, f, max(k, 5)))
            if "memorization" in metrics:
                found = memorization(train_f[view], f)
                row.update({f"memorization_{key}": value for key, value in found.summary().items()})
                results.setdefault("closest_pairs", {})[view] = _closest_pairs(found, train or real, fake,
                                                                               train_counts[view], fake_counts[view])
            per_view[view] = row
        results["views"] = per_view
        results["mean"] = {key: float(np.mean([row[key] for row in per_view.values()])) for key in per_view[views[0]]
                           if all(isinstance(row.get(key), float) for row in per_view.values())}
    if "paired" in metrics:
        results["paired"] = paired_by_name(real, fake)
    if "frd" in metrics:
        results["frd"] = frechet_radiomics_distance(real, fake)
    if "clip" in metrics:
        if clip is None or reports is None:
            raise MeddiffError("clip needs an image-text encoder (--clip SPEC) "
                               "and the fake images' reports (a manifest)")
        results["clip"] = clip_score_of(fake, reports, clip, plane)
    return results


def frechet_radiomics_distance(real: list[Path], fake: list[Path]) -> float:
    """FRD (v1) of the two image sets, computed by frd-score (pyradiomics features, no network).

    frd-score reads the files itself (NIfTI, MHA/NRRD, PNG/JPEG, single-file DICOM), z-scores the
    radiomic features against the real set and returns log of the squared Frechet distance.
    """
    import contextlib
    import io
    import logging

    try:
        import frd_score
    except ImportError:
        raise MeddiffError("FRD needs frd-score and pyradiomics: "
                           "pip install 'meddiff[radiomics]' (see pyproject.toml)") from None
    folders = [p for p in real + fake if p.is_dir()]
    if folders:
        raise MeddiffError("FRD reads image files, not DICOM series folders: "
                           f"convert {folders[0]} first (meddiff convert)")
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # frd-score prints its result
            value = frd_score.compute_frd([[str(p) for p in real], [str(p) for p in fake]], num_workers=1)
    except (ValueError, RuntimeError) as exc:  # e.g. pyradiomics cannot bin a nearly empty image
        raise MeddiffError(f"frd-score could not compute FRD on these images: {exc}") from None
    return float(value)


def frechet_radiomics_distance_of_slices(real: Sequence[np.ndarray], fake: Sequence[np.ndarray],
                                         spacing: Sequence[float]) -> float:
    """FRD of two sets of 2D arrays of ``spacing`` mm pixels: written as NIfTI slices to a temporary folder for
    ``frechet_radiomics_distance`` (frd-score reads files). Few slices make its covariance rank-deficient: numpy's
    warnings about that are silenced, the number is rough."""
    import tempfile
    import warnings

    from meddiff.image import Image
    from meddiff.io import save_image

    affine = np.diag([*spacing[:2], 1.0, 1.0])
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        paths = {tag: [save_image(Image(a, affine), Path(tmp) / f"{tag}_{i:04d}.nii.gz") for i, a in enumerate(arrays)]
                 for tag, arrays in (("real", real), ("fake", fake))}
        return frechet_radiomics_distance(paths["real"], paths["fake"])


def _counts(features: list[dict[str, np.ndarray]]) -> dict[str, list[int]]:
    """Feature rows per image and view (volumes give several slices per plane)."""
    return {view: [len(f[view]) for f in features] for view in features[0]}


def _closest_pairs(found, train: list[Path], fake: list[Path], train_counts: list[int], fake_counts: list[int],
                   n: int = 8) -> list[dict]:
    """The ``n`` fake feature rows nearest to a training row, as (fake image, training image, distance)."""
    train_owner, fake_owner = (np.repeat(np.arange(len(train)), train_counts),
                               np.repeat(np.arange(len(fake)), fake_counts))
    order = np.argsort(found.ratio)[:n]
    return [{"fake": str(fake[fake_owner[i]]), "train": str(train[train_owner[found.nearest[i]]]),
             "distance": float(found.distance[i]), "ratio": float(found.ratio[i])} for i in order]


def plot_closest_pairs(pairs: list[dict], path: str | os.PathLike) -> Path:
    """A PNG grid: each column a generated image over its closest training image (middle slice of volumes)."""
    from meddiff.viz import save_grid

    def middle(p: str) -> np.ndarray:
        array = load_image(p).array.squeeze()
        return array if array.ndim == 2 else array[:, :, array.shape[2] // 2]

    fakes, trains = [middle(p["fake"]) for p in pairs], [middle(p["train"]) for p in pairs]
    shape = max(a.shape[0] for a in fakes + trains), max(a.shape[1] for a in fakes + trains)
    padded = [np.pad(a, [(0, shape[0] - a.shape[0]), (0, shape[1] - a.shape[1])]) for a in fakes + trains]
    return save_grid(padded, path, columns=len(pairs))


def paired_by_name(real: list[Path], fake: list[Path]) -> dict[str, float]:
    """Mean PSNR/SSIM(/MS-SSIM) over images present in both lists under the same file name."""
    by_name = {p.name: p for p in real}
    if len(by_name) < len(real) or len({p.name for p in fake}) < len(fake):
        raise MeddiffError("paired metrics match images by file name, and some file names repeat: "
                           "give folders with unique names")
    pairs = [(by_name[p.name], p) for p in fake if p.name in by_name]
    if not pairs:
        raise MeddiffError("paired metrics need real and fake images with the same file names; none match")
    rows = []
    for reference_path, estimate_path in tqdm(pairs, desc="paired", unit="pair"):
        reference, estimate = load_image(reference_path).array, load_image(estimate_path).array
        if reference.shape != estimate.shape:
            raise MeddiffError(f"{estimate_path.name}: shape {estimate.shape} differs from the real image's "
                               f"{reference.shape}")
        rows.append(paired(reference, estimate))
    summary = {"pairs": len(rows)}
    for key in rows[0]:
        values = [r[key] for r in rows if r[key] is not None]
        if values:
            summary[key] = float(np.mean(values))
    return summary


def table(results: dict) -> str:
    """The results as a plain-text table (one row per view, then the mean)."""
    lines = [f"real {results['real']} images, fake {results['fake']} images"
             + (f", features {results['features']}" if "features" in results else "")]
    if "views" in results:
        keys = list(next(iter(results["views"].values())))
        lines.append("view      " + "".join(f"{k.removeprefix('memorization_'):>20s}" for k in keys))
        rows = [*results["views"].items(), *([("mean", results["mean"])] if len(results["views"]) > 1 else [])]
        for view, row in rows:
            lines.append(f"{view:10s}" + "".join(f"{_cell(row.get(k)):>20s}" for k in keys))
    if "frd" in results:
        lines.append(f"FRD (radiomics, frd-score v1): {results['frd']:.4g}")
    if "clip" in results:
        lines.append(f"CLIP score ({results['clip']['encoder']}): {results['clip']['clip_score']:.4g} over "
                     f"{results['clip']['images']} images")
    if "paired" in results:
        lines.append("paired    " + "  ".join(f"{k} {_cell(v)}" for k, v in results["paired"].items()))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
