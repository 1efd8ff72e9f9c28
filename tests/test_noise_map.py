"""Noise that varies across the image: a noise map, estimated (``meddiff.diffusion.noise_map``) or given
(``meddiff denoise --noise-map``), and each tile matched to its own noise."""

from __future__ import annotations

import numpy as np
import pytest
from test_denoise import pipeline_for

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.diffusion.noise_map import estimate_noise_map


def phantom(n: int = 96) -> np.ndarray:
    clean = np.zeros((n, n), np.float32)
    clean[8:-8, 8:-8] = 100.0
    clean[n // 3 : n // 2, 16:-16] = 60.0
    return clean


def rician(clean: np.ndarray, sigma: np.ndarray | float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.sqrt((clean + rng.normal(0, 1, clean.shape) * sigma) ** 2
                   + (rng.normal(0, 1, clean.shape) * sigma) ** 2).astype(np.float32)


def test_the_estimated_map_follows_noise_that_rises_threefold_across_the_image():
    clean = phantom(128)
    ramp = np.broadcast_to(np.linspace(2.0, 6.0, 128)[None, :], clean.shape)
    estimate = estimate_noise_map(rician(clean, ramp))
    inside = clean > 0
    assert estimate.shape == clean.shape and estimate.dtype == np.float32
    assert np.median(np.abs(estimate[inside] / ramp[inside] - 1)) < 0.1
    assert estimate[:, 100:][inside[:, 100:]].mean() > 1.7 * estimate[:, 20:28][inside[:, 20:28]].mean()
    flat = estimate_noise_map(rician(clean, 4.0, seed=1))
    assert np.percentile(flat[inside], 95) / np.percentile(flat[inside], 5) < 1.3


def test_a_constant_map_denoises_as_the_same_sigma_does():
    """The tile path with a map: every tile's mean noise is the one sigma, so the result is that of --noise-sigma."""
    pipeline = pipeline_for(2, shape=(32, 32))
    image = Image(rician(phantom(80), 5.0), np.eye(4), "MR")
    one = pipeline.denoise(image, noise_sigma=5.0, progress=False, tile=(32, 32)).array
    mapped = pipeline.denoise(image, noise_map=np.full(image.array.shape, 5.0), progress=False, tile=(32, 32)).array
    np.testing.assert_allclose(mapped, one, rtol=1e-4, atol=1e-3)
    twice = pipeline.denoise(image, noise_map=np.full(image.array.shape, 10.0), progress=False, tile=(32, 32)).array
    assert np.abs(twice - one).max() > 1e-2  # the map's values reach the network


def test_bad_maps_are_refused_in_one_line():
    pipeline = pipeline_for(2, shape=(16, 16))
    image = Image(rician(phantom(48), 5.0), np.eye(4), "MR")
    for bad, match in ((np.full((40, 40), 5.0), "noise map has shape"), (np.zeros((48, 48)), "positive and finite"),
                       (np.full((48, 48), np.nan), "positive and finite")):
        with pytest.raises(MeddiffError, match=match):
            pipeline.denoise(image, noise_map=bad, progress=False)
    with pytest.raises(MeddiffError, match="not both"):
        pipeline.denoise(image, noise_map=np.full((48, 48), 5.0), noise_sigma=5.0, progress=False)
    with pytest.raises(MeddiffError, match="--steps 1"):
        pipeline.denoise(image, local_noise=True, steps=3, progress=False)


def test_cli_takes_a_map_file_or_estimates_one(tmp_path):
    clean = phantom(64)
    ramp = np.broadcast_to(np.linspace(2.0, 6.0, 64)[None, :], clean.shape).astype(np.float32)
    save_image(Image(rician(clean, ramp), np.eye(4), "MR"), tmp_path / "noisy.nii.gz")
    save_image(Image(ramp.copy(), np.eye(4)), tmp_path / "map.nii.gz")
    save_image(Image(ramp[:32].copy(), np.eye(4)), tmp_path / "small_map.nii.gz")
    for option, out in (("estimate", "a.nii.gz"), (str(tmp_path / "map.nii.gz"), "b.nii.gz")):
        assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(tmp_path / out),
                     "--noise-map", option]) == 0
        assert load_image(tmp_path / out).array.shape == (64, 64)
    assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(tmp_path / "c.nii.gz"),
                 "--noise-map", str(tmp_path / "small_map.nii.gz")]) == 2
    assert not (tmp_path / "c.nii.gz").exists()
