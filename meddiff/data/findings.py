"""The offline "findings" set: real MRI slices with simulated lesions and the reports that describe them.

A compositional test bed for report-conditioned generation that needs no downloads: axial slices of
nilearn's MNI152 T1 (3 mm, 65 x 72, symmetric about the middle column) get 0-2 lesions whose attributes
(hyper/hypointense, small/large, left/right, anterior/posterior) are written into a templated report
with paraphrases; half of the reports leave some attributes unsaid, as real reports do. Two attribute
combinations never appear in training (``HELD_OUT``), so a model's compositional generalisation can be
measured on them. ``detect`` reads the attributes back from an image analytically (left-right mirror
asymmetry of a local-contrast residual), for scoring generated images without a trained classifier.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from meddiff.errors import MeddiffError

ATTRIBUTES = {"intensity": ("hyperintense", "hypointense"), "size": ("small", "large"), "side": ("left", "right"),
              "region": ("anterior", "posterior")}
HELD_OUT = (("hypointense", "large", "left", "anterior"), ("hyperintense", "small", "right", "posterior"))
RADIUS = {"small": 2.5, "large": 5.0}  # pixels of 3 mm
MM_PER_PIXEL = 3.0


@dataclass(frozen=True)
class Finding:
    """What an image shows: ``count`` lesions (0-2) sharing the four attributes (None when count is 0)."""

    count: int
    intensity: str | None = None
    size: str | None = None
    side: str | None = None
    region: str | None = None

    @property
    def combination(self) -> tuple[str | None, ...]:
        return (self.intensity, self.size, self.side, self.region)


def base_slices() -> list[np.ndarray]:
    """Axial slices of the (left-right symmetric) MNI152 2009a template, 3 mm block means, in [0, 1].

    Voxel columns 1..195 are centred on x = 0 (voxel 98), so the 65-pixel-wide slices are symmetric
    about their middle column and the flipped image mirrors the anatomy about the midline.
    """
    from meddiff.data.samples import nilearn_mni152

    volume = nilearn_mni152().array[1:196, 9:225, :]
    volume = volume / np.percentile(volume[volume > 0], 99.5)
    slices = []
    for z in range(60, 120, 3):
        plane = volume[:, :, z].reshape(65, 3, 72, 3).mean(axis=(1, 3))
        slices.append(np.clip(plane, 0, 1).astype(np.float32))
    return slices


def sample_finding(rng: np.random.Generator, held_out: bool | None = False) -> Finding:
    """A random finding; ``held_out`` True draws only held-out combinations, False never, None any."""
    count = int(rng.integers(0, 3))
    if count == 0:
        return Finding(0)
    combos = [c for c in itertools.product(*ATTRIBUTES.values()) if held_out is None or (c in HELD_OUT) == held_out]
    return Finding(count, *combos[int(rng.integers(len(combos)))])


def render(base: np.ndarray, finding: Finding, rng: np.random.Generator) -> np.ndarray:
    """``base`` with the finding's lesions drawn as soft discs inside the brain, in the named quadrant."""
    image = base.copy()
    if finding.count == 0:
        return image
    radius = RADIUS[finding.size]
    ii, jj = np.meshgrid(np.arange(base.shape[0]), np.arange(base.shape[1]), indexing="ij")
    brain = ndimage.binary_erosion(base > 0.25, iterations=int(np.ceil(radius)) + 1)
    mid_i, mid_j = (base.shape[0] - 1) / 2, ndimage.center_of_mass(base > 0.25)[1]
    side = ii < mid_i - radius - 2 if finding.side == "left" else ii > mid_i + radius + 2  # RAS: i grows to the right
    region = jj > mid_j + 3 if finding.region == "anterior" else jj < mid_j - 3
    candidates = np.argwhere(brain & side & region)
    if len(candidates) == 0:
        raise MeddiffError("this slice has no room for a lesion in that quadrant")
    centres = []
    for _ in range(200):
        c = candidates[int(rng.integers(len(candidates)))]
        if all(np.hypot(*(c - o)) > 2 * radius + 4 for o in centres):  # apart, so they stay two blobs
            centres.append(c)
        if len(centres) == finding.count:
            break
    if len(centres) < finding.count:
        raise MeddiffError(f"this slice has no room for {finding.count} separate {finding.size} "
                           "lesions in that quadrant")
    for ci, cj in centres:
        profile = 1.0 / (1.0 + np.exp((np.hypot(ii - ci, jj - cj) - radius) / 0.6))
        image = image + 0.6 * profile if finding.intensity == "hyperintense" else image * (1.0 - 0.8 * profile)
    return np.clip(image, 0, 1.2).astype(np.float32)


_NONE = ("No acute abnormality.", "No focal lesion is seen.", "Normal study.")
_NUMBER = {1: ("A", "One", "A single"), 2: ("Two", "Two", "A pair of")}


def report(finding: Finding, rng: np.random.Generator) -> str:
    """A templated report of what ``finding`` states, one of several paraphrases, sizes sometimes in mm.

    Attributes left None are not mentioned ("A hyperintense lesion."), so the same function writes
    partial reports for training and k-attribute prompts for evaluation.
    """
    if finding.count == 0:
        return _NONE[int(rng.integers(len(_NONE)))]
    size = finding.size
    if size is not None and rng.random() < 0.5:
        size = f"{int(round(2 * RADIUS[size] * MM_PER_PIXEL + rng.integers(-1, 2)))} mm"
    words = " ".join(w for w in (size, finding.intensity, "lesion" if finding.count == 1 else "lesions") if w)
    number = _NUMBER[finding.count][int(rng.integers(3))]
    side, region = finding.side, finding.region
    if side and region:
        where = f" in the {side} {region} region" if rng.random() < 0.5 else f" in the {region} {side} hemisphere"
    else:
        where = f" in the {side} hemisphere" if side else f" in the {region} region" if region else ""
    if rng.random() < 0.5:
        return f"{number} {words}{where}."
    return f"There {'are' if number == 'Two' else 'is'} {number.lower()} {words}{where}."


def partial(finding: Finding, rng: np.random.Generator) -> Finding:
    """``finding`` as a report might state it: all attributes half of the time, else a random 1-3 of them."""
    if finding.count == 0 or rng.random() < 0.5:
        return finding
    keep = set(rng.choice(list(ATTRIBUTES), size=int(rng.integers(1, 4)), replace=False))
    return Finding(finding.count, *(getattr(finding, a) if a in keep else None for a in ATTRIBUTES))


def detect(image: np.ndarray, threshold: float = 0.15) -> Finding:
    """The finding in an image of this set, read from its left-right asymmetry (the anatomy is symmetric).

    Blobs of ``|image - mirror(image)|`` above ``threshold`` are lesions or their mirror images; the
    lesion is on the side where the image departs more from its local median (a 15-pixel window), its
    contrast against the mirror gives hyper/hypo, its area the size, its centroid the region.
    """
    asymmetry = image - image[::-1]
    residual = np.abs(image - ndimage.median_filter(image, size=15))
    half = image.shape[0] // 2  # the middle column (odd width) is its own mirror and left out
    labels, n = ndimage.label(np.abs(asymmetry[:half]) > threshold)
    mid_j = ndimage.center_of_mass(image > 0.25)[1]
    lesions = []
    for k in range(1, n + 1):
        blob = labels == k
        if blob.sum() < 4:
            continue
        on_left = residual[:half][blob].mean() >= residual[::-1][:half][blob].mean()
        contrast = asymmetry[:half][blob].mean() * (1 if on_left else -1)
        lesions.append(("hyperintense" if contrast > 0 else "hypointense", "large" if blob.sum() > 40 else "small",
                        "left" if on_left else "right",
                        "anterior" if ndimage.center_of_mass(blob)[1] > mid_j else "posterior"))
    if not lesions:
        return Finding(0)
    return Finding(min(len(lesions), 2), *lesions[0])


def write_findings_dataset(out_dir: str | os.PathLike, per_split: dict[str, int] | None = None, seed: int = 0,
                           overwrite: bool = False) -> Path:
    """Images (NIfTI, 3 mm), reports and attribute labels with a manifest; held-out combinations only in 'test'.

    All or nothing: the set is written into a staging folder that becomes ``out_dir`` when complete;
    ``out_dir`` must be new or empty unless ``overwrite`` (see ``staged_folder``).
    """
    from meddiff.data.manifest import Record, write_manifest
    from meddiff.data.staging import staged_folder
    from meddiff.image import Image
    from meddiff.io import save_image

    per_split = per_split or {"train": 400, "val": 40, "test": 80}
    if min(per_split.values()) < 0:
        raise MeddiffError("the number of images per split must not be negative")
    if not sum(per_split.values()):
        raise MeddiffError("no images asked for — give --train, --val or --test a positive count")
    out_dir = Path(out_dir)
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        rng = np.random.default_rng(seed)
        bases = base_slices()
        affine = np.diag([MM_PER_PIXEL, MM_PER_PIXEL, MM_PER_PIXEL, 1.0])
        records = []
        for split, n in per_split.items():
            for k in range(n):
                held_out = None if split == "test" else False
                finding = sample_finding(rng, held_out)
                image = None
                while image is None:  # some slices have no room for two large lesions in a quadrant: try another
                    try:
                        image = render(bases[int(rng.integers(len(bases)))], finding, rng)
                    except MeddiffError:
                        continue
                name = f"{split}_{k:05d}.nii.gz"
                save_image(Image(image, affine, "MR"), stage / name)
                labels = {key: value for key, value in asdict(finding).items() if value is not None}
                records.append(Record(image=name, modality="MR", split=split, report=report(partial(finding, rng), rng),
                                      labels=labels, spacing=[MM_PER_PIXEL] * 2,
                                      source="meddiff findings (MNI152 + simulated lesions)", synthetic=True))
        write_manifest(records, stage / "manifest.jsonl")
        (stage / "held_out.json").write_text(json.dumps([dict(zip(ATTRIBUTES, c, strict=True)) for c in HELD_OUT],
                                                        indent=2) + "\n")
    return out_dir / "manifest.jsonl"
