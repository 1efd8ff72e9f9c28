"""The bundled super-resolution models on held-out real volumes (regression), and ``meddiff upsample`` choosing them
by modality."""

from __future__ import annotations

import numpy as np
import pydicom

from meddiff import Image
from meddiff.cli.main import main
from meddiff.data.samples import CHEST_CT_SLABS, chest_ct_slab
from meddiff.data.thick import slab_average
from meddiff.pipelines import load_pipeline
from meddiff.pipelines.upsample import upsample


def thick_ct(factor: int) -> tuple[Image, np.ndarray]:
    """The middle of the chest CT's held-out slab (160 x 160 voxels, 17 slices of 2.5 mm) made ``factor`` times
    thicker by slab averaging, and the truth."""
    start, stop, _ = CHEST_CT_SLABS["chest_ct_test"]
    image = chest_ct_slab(start, stop)()
    truth = image.array[176:336, 176:336, :17]
    centres = np.arange(0, 17, factor)
    affine = image.affine @ np.diag([1.0, 1.0, float(factor), 1.0])
    return Image(np.round(slab_average(truth, 2, centres, factor)), affine, "CT"), truth


def test_ct_upsample_beats_cubic_at_4x_on_the_held_out_slab():
    thick, truth = thick_ct(4)
    pipeline = load_pipeline("ct-upsample")
    made, report = pipeline.upsample(thick, factor=4, method="model", progress=False)
    cubic = upsample(thick, factor=4, method="cubic", progress=False)[0]
    assert report.method == "model" and np.array_equal(made.array[:, :, ::4], thick.array)
    between = [k for k in range(17) if k % 4]
    error = {name: np.mean((a[:, :, between] - truth[:, :, between]) ** 2) for name, a in
             (("model", made.array), ("cubic", cubic.array))}
    assert error["model"] < error["cubic"]


def test_the_cli_picks_the_bundled_model_of_the_series_modality(ct_series_dir, tmp_path, capsys):
    assert main(["upsample", "-i", str(ct_series_dir), "-o", str(tmp_path / "thin"), "--format", "dcm",
                 "--factor", "5", "--method", "model"]) == 0
    assert capsys.readouterr().out.startswith("model: 5x through-plane")
    sha = load_pipeline("ct-upsample").model.weights_sha256[:16]
    first = pydicom.dcmread(sorted((tmp_path / "thin").glob("*.dcm"))[0])
    assert f"model {sha}" in first.DerivationDescription and "acquired slices kept" in first.DerivationDescription
