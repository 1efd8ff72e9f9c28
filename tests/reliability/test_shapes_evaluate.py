"""Odd image shapes through `manifest build` and `evaluate`: singleton axes, tiny and odd sizes
work or end in one line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff

SHAPES = {"X,Y": (37, 53), "X,Y,1": (37, 53, 1), "1,X,Y": (1, 37, 53), "X,1,Y": (37, 1, 53), "odd volume": (21, 17, 9)}


def write_set(folder, shape, n=3, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        affine = np.diag([0.9, 1.1, 3.0, 1.0])
        nib.save(nib.Nifti1Image((rng.random(shape) * 100).astype(np.float32), affine), folder / f"img{i}.nii.gz")


@pytest.mark.parametrize("shape", list(SHAPES))
def test_evaluate_and_manifest_build_take_every_layout(shape, workdir):
    write_set(workdir / "real", SHAPES[shape])
    write_set(workdir / "fake", SHAPES[shape], seed=1)
    result = run_meddiff("evaluate", "--real", "real", "--fake", "fake", "--metrics", "fid,paired", "--cache", "none",
                         "--json", "out.json")
    assert result.code == 0, result.err
    metrics = json.loads((workdir / "out.json").read_text())
    assert metrics["paired"]["pairs"] == 3
    result = run_meddiff("manifest", "build", "real", "-o", "real.jsonl", "--modality", "MR")
    assert result.code == 0, result.err
    records = [json.loads(line) for line in (workdir / "real.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(len(r["spacing"]) == len(SHAPES[shape]) for r in records)


def test_images_smaller_than_a_metric_window_end_in_one_line(workdir):
    write_set(workdir / "real", (8, 8))
    write_set(workdir / "fake", (8, 8), seed=1)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("evaluate", "--real", "real", "--fake", "fake", "--metrics", "paired",
                                   "--cache", "none"), "8")
    before.assert_unchanged()
