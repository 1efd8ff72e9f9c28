"""The offline findings set: lesions drawn as reported, held-out combinations kept out of training,
detector accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff import MeddiffError, load_image
from meddiff.cli.main import main
from meddiff.data.findings import ATTRIBUTES, HELD_OUT, Finding, base_slices, detect, render, report
from meddiff.data.manifest import Manifest


@pytest.fixture(scope="module")
def findings_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("findings")
    assert main(["manifest", "findings", "-o", str(out), "--train", "60", "--val", "0", "--test", "60",
                 "--seed", "1"]) == 0
    return out


def test_held_out_combinations_only_in_test_and_reports_match_labels(findings_dir):
    records = Manifest.read(findings_dir / "manifest.jsonl").records

    def combos(split):
        return {tuple(r.labels.get(k) for k in ("intensity", "size", "side", "region"))
                for r in records if r.split == split}

    assert not combos("train") & set(HELD_OUT) and combos("test") & set(HELD_OUT)
    for r in records:
        if r.labels["count"] == 0:
            assert not any(word in r.report for word in ("hyperintense", "hypointense", "left", "right"))
        else:  # every attribute a report states is true; partial reports leave some unsaid
            stated = {a for a, values in ATTRIBUTES.items() for v in values
                      if v in r.report or (a == "size" and " mm " in r.report)}
            assert stated and all(r.labels[a] in r.report or (a == "size" and " mm " in r.report) for a in stated)
            assert not any(v in r.report for a, values in ATTRIBUTES.items() for v in values if v != r.labels[a])
    assert sum(all(r.labels[a] in r.report for a in ("intensity", "side", "region")) for r in records
               if r.labels["count"]) > 10
    assert all(r.synthetic and r.spacing == [3.0, 3.0] for r in records)


def test_detector_reads_every_attribute_back_from_real_slices_with_lesions(findings_dir):
    """The analytic detector that scores generated images: >= 95 % all-attributes-correct on the test split."""
    records = [r for r in Manifest.read(findings_dir / "manifest.jsonl").records if r.split == "test"]
    correct = [detect(load_image(findings_dir / r.image).array) == Finding(**r.labels) for r in records]
    assert np.mean(correct) >= 0.95


def test_lesions_change_the_slice_only_where_reported():
    base = base_slices()[10]
    rng = np.random.default_rng(0)
    image = render(base, Finding(1, "hyperintense", "large", "left", "anterior"), rng)
    changed = np.argwhere(np.abs(image - base) > 0.05)
    assert len(changed) > 40 and (changed[:, 0] < 32).all()  # left half (RAS: i grows to the right)
    assert (changed[:, 1] > 36 - 6).all()  # anterior of the brain's centre row
    assert detect(base) == Finding(0)
    assert "No" in report(Finding(0), rng) or "Normal" in report(Finding(0), rng)
    with pytest.raises(MeddiffError, match="no room"):
        render(np.zeros((65, 72), np.float32) + (np.arange(72) > 60) * 0.5,
               Finding(1, "hyperintense", "large", "left", "posterior"), rng)
