"""The Rician noise floor of magnitude MR is removed from denoised images where the image shows it.

A denoiser trained for Gaussian noise returns the Rician mean ``E[M | A]``: about ``sigma * sqrt(pi/2)``
where the truth is 0. ``meddiff.diffusion.rician`` inverts that mean (checked here against scipy's
Rician distribution) and ``DiffusionPipeline.denoise`` applies it to magnitude MR by default, where the
background's and bright tissue's sigma agree (``floor_sigma``).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from meddiff import Image
from meddiff.diffusion.noise_level import NoiseEstimate
from meddiff.diffusion.rician import BREAK_EVEN, correct_rician_bias, floor_sigma, rician_amplitude

FLOOR = np.sqrt(np.pi / 2)  # the Rayleigh mean / sigma: what the background shows without the correction


@pytest.mark.parametrize("sigma", [0.01, 1.0, 250.0])
def test_inverse_of_scipys_rician_mean(sigma):
    nu = np.array([0.0, 0.05, 0.3, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 9.9, 10.02, 17.3, 29.9, 36.0])
    np.testing.assert_allclose(rician_amplitude(stats.rice.mean(nu) * sigma, sigma), nu * sigma, rtol=1e-4,
                               atol=0.03 * sigma)
    # beyond the table (scipy's mean overflows from about 38 sigma): E[M] = sqrt(A^2 + sigma^2) to within 1e-5 sigma
    big = np.array([30.0, 30.1, 100.0, 1e4])
    np.testing.assert_allclose(rician_amplitude(np.sqrt(big**2 + 1) * sigma, sigma), big * sigma, rtol=1e-5)
    below = np.array([-3.0, 0.0, 0.5, FLOOR - 1e-6]) * sigma
    np.testing.assert_array_equal(rician_amplitude(below, sigma), 0.0)  # at or under the floor: no signal


@pytest.mark.parametrize("amplitude", [0.0, 0.5, 1.0, 2.0, 6.0])
def test_monte_carlo_mean_of_rician_samples_gives_back_the_amplitude(amplitude):
    sigma, n = 3.0, 400_000
    samples = stats.rice.rvs(amplitude / sigma, scale=sigma, size=n,
                             random_state=np.random.default_rng(int(amplitude * 10)))
    sample_mean = samples.mean()
    assert abs(sample_mean - stats.rice.mean(amplitude / sigma) * sigma) < 4 * samples.std() / np.sqrt(n)
    estimate = float(rician_amplitude(np.array(sample_mean), sigma))
    # near A = 0 the mean is flat in A, so the Monte-Carlo error of the mean is magnified there
    assert abs(estimate - amplitude) < (0.15 if amplitude == 0 else 0.03) * sigma
    assert abs(sample_mean - amplitude) > (0.1 * sigma if amplitude <= 2 else 0.0)  # the bias the correction removes


def test_only_magnitude_mr_is_corrected():
    array = np.array([[0.5, 1.0], [3.0, 10.0]], np.float32)
    corrected = correct_rician_bias(array, 1.0, Image(array, np.eye(4), "MR"))
    assert corrected.dtype == np.float32 and corrected.shape == array.shape
    assert corrected[0, 0] == 0 and corrected[1, 1] == pytest.approx(np.sqrt(99.0), rel=1e-4)
    # NIfTI: unknown
    np.testing.assert_array_equal(correct_rician_bias(array, 1.0, Image(array, np.eye(4), None)), corrected)
    # CT, or signed values: not magnitude MR
    for source in (Image(array, np.eye(4), "CT"), Image(array - 1, np.eye(4), "MR")):
        assert correct_rician_bias(array, 1.0, source) is array
    assert correct_rician_bias(array, 1.0, Image(array, np.eye(4), "MR"), enabled=False) is array
    assert correct_rician_bias(array, None, Image(array, np.eye(4), "MR")) is array  # no reliable floor: kept
    with pytest.raises(ValueError, match="sigma"):
        rician_amplitude(array, 0.0)


def test_break_even_over_estimate_of_sigma():
    """Corrected with up to BREAK_EVEN x the noise, the exact Rician mean of any amplitude ends no further from
    it than without the correction; a little more, and amplitudes around 0.7 sigma are set to 0."""
    assert BREAK_EVEN == pytest.approx(1.119, abs=1e-3)
    nu = np.linspace(0.0, 30.0, 30001)
    mean = stats.rice.mean(nu)
    for factor in (0.5, 1.0, 1.05, BREAK_EVEN - 1e-3):
        assert np.all(np.abs(rician_amplitude(mean, factor) - nu) <= mean - nu + 1e-3), factor
    assert np.any(np.abs(rician_amplitude(mean, BREAK_EVEN + 0.02) - nu) > mean - nu + 0.05)


def test_floor_only_where_background_and_tissue_agree():
    assert floor_sigma(NoiseEstimate(2.0)) is None  # no background: nothing shows the floor
    assert floor_sigma(NoiseEstimate(2.0, 2.0)) is None  # no bright tissue to confirm it
    assert floor_sigma(NoiseEstimate(2.0, 2.0, 1.9, 0.01)) == 1.9  # agreement: the smaller
    assert floor_sigma(NoiseEstimate(2.0, 2.0, 3.0, 0.01)) == 2.0  # texture raises the tissue's: safe
    assert floor_sigma(NoiseEstimate(3.0, 3.0, 2.0, 0.01)) is None  # dark tissue taken for background
    # within BREAK_EVEN, but not at 95 % confidence when few voxels measured it
    assert floor_sigma(NoiseEstimate(2.1, 2.1, 2.0, 0.01)) == 2.0
    assert floor_sigma(NoiseEstimate(2.1, 2.1, 2.0, 0.05)) is None


@pytest.fixture(scope="module")
def head_crop():
    """The top of dipy's T1 slice (held out from training): half air whose truth is exactly 0, half brain."""
    from scipy import ndimage

    from meddiff.data.samples import dipy_t1_slice
    from meddiff.metrics import foreground_mask

    clean = dipy_t1_slice().array.squeeze()[16:144, 40:168].astype(np.float32)
    background = ~ndimage.binary_dilation(foreground_mask(clean), iterations=3)
    assert background.mean() > 0.3 and clean[background].max() == 0
    return clean, background


def test_denoised_background_loses_the_noise_floor(head_crop):
    """Fails on main: the bundled model leaves the background at ~1.23 sigma (the Rayleigh mean)."""
    from meddiff.data.synthetic import rician_noise
    from meddiff.metrics import foreground_mask, psnr
    from meddiff.pipelines import load_pipeline

    clean, background = head_crop
    sigma = 0.05 * float(clean.max())
    noisy = Image(rician_noise(clean, sigma, np.random.default_rng(5)), np.eye(4), "MR")
    pipeline = load_pipeline("mri-denoise")
    denoised = pipeline.denoise(noisy).array
    assert denoised[background].mean() < 0.3 * sigma  # measured 0.14 sigma (1.20 sigma without the correction)
    kept = pipeline.denoise(noisy, rician_correction=False).array
    assert kept[background].mean() > FLOOR * sigma * 0.9  # the floor the correction removes is there
    mask = foreground_mask(clean)
    assert psnr(clean, denoised, 1.0, mask) >= psnr(clean, kept, 1.0, mask) - 0.05  # the anatomy loses nothing


def test_cli_option_keeps_the_floor(head_crop, workdir):
    from harness import Snapshot, run_meddiff

    from meddiff.data.synthetic import rician_noise
    from meddiff.io import load_image, save_image

    clean, background = head_crop
    sigma = 0.05
    save_image(Image(rician_noise(clean, sigma, np.random.default_rng(6)), np.eye(4), "MR"), workdir / "noisy.nii.gz")
    means = {}
    for flags in ((), ("--no-rician-correction",)):
        snapshot = Snapshot(workdir)
        result = run_meddiff("denoise", "-i", "noisy.nii.gz", "-o", "out.nii.gz", "--overwrite", *flags, cwd=workdir)
        assert result.code == 0, result.err
        snapshot.assert_unchanged(allowed=("out.nii.gz",))
        means[flags] = float(load_image(workdir / "out.nii.gz").array[background].mean())
    assert means[()] < 0.3 * sigma < FLOOR * sigma * 0.9 < means[("--no-rician-correction",)]
