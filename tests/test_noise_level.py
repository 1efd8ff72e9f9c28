"""Rician-aware noise estimation on real MRI with synthetic noise of known sigma."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff import MeddiffError, load_image
from meddiff.diffusion.noise_level import estimate_noise_sigma


def rician(clean: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2)


@pytest.fixture(scope="module")
def clean_images(mni_t1):
    from dipy.data import get_fnames

    mni = load_image(mni_t1).array.astype(np.float64)
    return {
        "t1_coronal_slice (background)": np.load(get_fnames(name="t1_coronal_slice")).astype(np.float64),
        "MNI volume (background)": mni[30:170, 30:200, 50:130],
        "MNI brain crop (no background)": mni[75:125, 90:150, 70:110],
    }


@pytest.mark.parametrize("percent", [1, 3, 5, 7, 9])
def test_estimate_within_15_percent_of_true_sigma(clean_images, percent):
    rng = np.random.default_rng(percent)
    for name, clean in clean_images.items():
        sigma = percent / 100 * clean.max()
        estimate = estimate_noise_sigma(rician(clean, sigma, rng))
        assert abs(estimate / sigma - 1) <= 0.15, (name, estimate / sigma)


def test_background_and_tissue_agree_within_their_spread():
    """Half air, half flat tissue: the two estimates measure the one sigma, and ``spread`` is the relative
    standard error of their ratio over noise draws (Monte Carlo constants of ``noise_level``)."""
    from meddiff.diffusion.noise_level import estimate_noise

    rng = np.random.default_rng(0)
    clean = np.zeros((64, 64))
    clean[:, 32:] = 20.0
    estimates = [estimate_noise(rician(clean, 1.0, rng)) for _ in range(60)]
    ratios = np.log([e.background / e.tissue for e in estimates])
    spread = np.mean([e.spread for e in estimates])
    assert abs(ratios.mean()) < 0.03 and 0.6 < ratios.std() / spread < 1.5, (ratios.mean(), ratios.std(), spread)


def test_dark_tissue_without_air_is_not_taken_for_a_clean_background():
    """A real 64x64 MR crop with no air (pydicom's MR_small) at 9 % noise: the background fit takes dark tissue
    for background (1.5x the noise), the bright tissue's sigma does not follow it."""
    from pydicom.data import get_testdata_file

    from meddiff.diffusion.noise_level import estimate_noise

    clean = load_image(get_testdata_file("MR_small.dcm")).array.squeeze().astype(np.float64)
    sigma = 0.09 * clean.max()
    estimate = estimate_noise(rician(clean, sigma, np.random.default_rng(9)))
    assert estimate.background > 1.3 * sigma and abs(estimate.tissue / sigma - 1) < 0.15


def test_bad_input_is_refused():
    with pytest.raises(MeddiffError, match="NaN"):
        estimate_noise_sigma(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(MeddiffError, match="constant"):
        estimate_noise_sigma(np.zeros((8, 8)))


def test_timestep_matches_the_forward_process_noise():
    from meddiff.diffusion.noise_level import timestep_for_sigma
    from meddiff.diffusion.schedulers import NoiseSchedule

    abar = NoiseSchedule(beta_schedule="cosine").training_scheduler().alphas_cumprod.numpy()
    for t in (5, 50, 300, 700):
        sigma = float(np.sqrt((1 - abar[t]) / abar[t]))  # the noise of x_t / sqrt(abar_t) around x0
        assert timestep_for_sigma(sigma, abar) == t
    assert timestep_for_sigma(1e-6, abar) == 0 and timestep_for_sigma(1e6, abar) == len(abar) - 1
    with pytest.raises(MeddiffError, match="positive"):
        timestep_for_sigma(0.0, abar)
