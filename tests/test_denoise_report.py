"""``meddiff denoise --report``: the no-reference quality report of a denoising (``meddiff.diffusion.quality``)."""

from __future__ import annotations

import json

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from scipy import ndimage
from test_denoise import noisy, random_pipeline_and_noisy_square

from meddiff import Image, load_image
from meddiff.cli.main import main
from meddiff.diffusion.quality import denoise_report
from meddiff.files import file_sha256
from meddiff.io import save_image

CHECKS = {"noise", "residual", "whiteness", "structure"}


def step_edge(n: int = 64) -> np.ndarray:
    """A square of tissue in air whose left half is 80 and right half 160: a step edge inside the foreground."""
    clean = np.zeros((n, n), np.float32)
    clean[8:-8, 8 : n // 2] = 80.0
    clean[8:-8, n // 2 : -8] = 160.0
    return clean


def test_a_real_denoise_run_reports_every_field():
    pipeline, image = random_pipeline_and_noisy_square()
    clean = pipeline.denoise(image, noise_sigma=5.0, progress=False)
    report = pipeline.denoise_report(image, clean, noise_sigma=5.0)
    assert report["method"] == {"noise_sigma": 5.0, "noise_sigma_from": "given", "strength": 1.0,
                                "removed_sigma": 5.0}
    assert set(report["noise_sigma"]) == {"input", "output", "estimator"}
    residual = report["residual"]
    assert residual["foreground_voxels"] > 0 and residual["std"] > 0
    assert set(residual["autocorrelation"]) == {"lags", "axis 0", "axis 1"}
    assert all(len(residual["autocorrelation"][f"axis {a}"]) == 2 for a in (0, 1))
    assert set(report["checks"]) == CHECKS
    for check in report["checks"].values():
        assert set(check) == {"value", "limit", "ok", "verdict"} and check["verdict"]
    json.dumps(report)  # JSON-ready as it is


def test_whiteness_separates_noise_from_blurred_structure():
    clean, rng = step_edge(), np.random.default_rng(0)
    noise = rng.normal(0, 8.0, clean.shape)
    white = denoise_report(clean + noise, clean)
    assert max(abs(r) for a in (0, 1) for r in white["residual"]["autocorrelation"][f"axis {a}"]) < 0.05
    assert white["checks"]["whiteness"]["ok"] is True
    blob = ndimage.gaussian_filter(rng.normal(size=clean.shape), 2.0)
    smooth = denoise_report(clean + noise + 16.0 * blob / blob.std(), clean)
    assert smooth["checks"]["whiteness"]["value"] > 0.5 and smooth["checks"]["whiteness"]["ok"] is False


def test_structure_flags_a_blur_that_removes_the_edge():
    clean = step_edge()
    image = noisy(clean, 5)
    blurred = denoise_report(image, ndimage.gaussian_filter(image, 3.0))
    assert blurred["residual"]["edge_correlation"] > 0.2
    assert blurred["checks"]["structure"]["ok"] is False and blurred["checks"]["residual"]["ok"] is False
    noise_only = denoise_report(clean + np.random.default_rng(1).normal(0, 8.0, clean.shape), clean)
    assert abs(noise_only["residual"]["edge_correlation"]) < 0.05 and noise_only["checks"]["structure"]["ok"]


def test_volumes_report_per_slice_and_4d_per_volume():
    rng = np.random.default_rng(2)
    clean = np.stack([step_edge(32)] * 3, axis=-1)
    volume = denoise_report(clean + rng.normal(0, 8.0, clean.shape), clean, axis=2)
    assert all(len(values) == 3 for values in volume["slices"].values())
    assert set(volume["residual"]["autocorrelation"]) == {"lags", "axis 0", "axis 1"}
    mask = np.zeros(clean.shape, bool)
    mask[:16] = True
    assert denoise_report(clean + 1.0, clean, mask=mask)["residual"]["foreground_voxels"] == (mask & (clean > 0)).sum()
    series = np.stack([clean, clean], axis=-1)
    report = denoise_report(series + rng.normal(0, 8.0, series.shape), series, strength=0.5)
    assert len(report["volumes"]) == 2 and all(v["method"]["strength"] == 0.5 for v in report["volumes"])


def test_cli_writes_the_report_beside_the_output_only_when_asked(tmp_path):
    save_image(Image(noisy(step_edge(48), 5), np.diag([0.9, 0.9, 1.0, 1.0]), "MR"), tmp_path / "noisy.nii.gz")
    plain, out = tmp_path / "plain.nii.gz", tmp_path / "out.nii.gz"
    assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(plain)]) == 0
    assert not list(tmp_path.glob("*.json"))
    argv = ["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(out), "--report"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out.nii.gz.report.json").read_text())
    assert report["output"] == "out.nii.gz" and report["output_sha256"] == file_sha256(out)
    assert report["spec"]["strength"] == 0.75 and report["method"]["noise_sigma_from"] == "estimated"
    assert set(report["checks"]) == CHECKS
    np.testing.assert_array_equal(load_image(out).array, load_image(plain).array)  # the report changes nothing
    assert main(argv) == 2  # an existing output is not replaced without --overwrite, the report neither
    (tmp_path / "again.nii.gz.report.json").write_text("{}")
    assert main([*argv[:4], str(tmp_path / "again.nii.gz"), "--report"]) == 2
    assert not (tmp_path / "again.nii.gz").exists()  # refused before any work
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((tmp_path / "out.nii.gz.report.json").read_text())["output_sha256"] == file_sha256(out)


def test_cli_report_beside_a_dicom_series_and_its_summary_in_the_description(tmp_path):
    out = tmp_path / "denoised"
    assert main(["denoise", "-i", get_testdata_file("MR_small.dcm"), "-o", str(out), "--format", "dcm",
                 "--report"]) == 0
    report = json.loads((tmp_path / "denoised.report.json").read_text())
    assert report["output"] == "denoised" and report["output_sha256"] == file_sha256(out)
    assert all(p.suffix == ".dcm" for p in out.iterdir() if not p.name.startswith("."))  # the series only
    description = pydicom.dcmread(next(out.glob("*.dcm"))).DerivationDescription
    assert "report beside the series: noise sigma" in description and len(description) <= 1024
