"""Multi-coil magnitude MR (``meddiff denoise --coils N``): noncentral chi noise, its background estimate and its
floor removed by inverting the chi mean."""

from __future__ import annotations

import numpy as np
import pytest

from meddiff import Image, MeddiffError, save_image
from meddiff.cli.main import main
from meddiff.diffusion.noise_level import background_mean, estimate_noise
from meddiff.diffusion.rician import BREAK_EVEN, break_even, chi_mean, rician_amplitude
from meddiff.pipelines.spec import DenoiseSpec


def root_sum_of_squares(amplitude: np.ndarray, sigma: float, coils: int, rng: np.random.Generator) -> np.ndarray:
    """A magnitude image of ``coils`` channels with complex Gaussian noise ``sigma``, the signal in the first."""
    channels = rng.normal(0.0, sigma, (2 * coils, *amplitude.shape))
    channels[0] += amplitude
    return np.sqrt((channels**2).sum(axis=0)).astype(np.float32)


@pytest.mark.parametrize("coils", [1, 4])
def test_the_chi_mean_matches_simulation_and_its_inverse_recovers_the_amplitude(coils):
    rng = np.random.default_rng(coils)
    nu = np.array([0.0, 0.5, 1.0, 2.0, 5.0, 20.0, 50.0])
    simulated = [root_sum_of_squares(np.full(40_000, v), 1.0, coils, rng).mean() for v in nu]
    np.testing.assert_allclose(chi_mean(nu, coils), simulated, rtol=0.01)
    sigma = 3.0
    inside = nu[nu > 0.4]  # below, the mean is flat in the amplitude and the table's steps dominate
    np.testing.assert_allclose(rician_amplitude(chi_mean(inside, coils) * sigma, sigma, coils), inside * sigma,
                               rtol=2e-3)
    assert rician_amplitude(np.array([chi_mean(0.0, coils) * sigma]), sigma, coils)[0] == 0.0
    assert background_mean(coils) == pytest.approx(float(chi_mean(0.0, coils)))


def test_four_coils_raise_the_floor_and_a_rician_inverse_would_leave_most_of_it():
    assert chi_mean(0.0, 4) == pytest.approx(2.7416, abs=1e-3) and break_even(1) == pytest.approx(BREAK_EVEN)
    assert 1.0 < break_even(4) < 1.2
    floor = chi_mean(0.0, 4) * 2.0  # pure noise of four coils, sigma 2, averaged
    assert rician_amplitude(np.array([floor]), 2.0, 4)[0] == 0.0
    assert rician_amplitude(np.array([floor]), 2.0, 1)[0] > 1.5 * 2.0  # as if one coil: grey, not air


def test_the_background_estimate_follows_the_coils():
    """Four-coil noise (sigma 5) around a bright square: the chi fit finds sigma; read as one coil, the background
    fits no Rayleigh distribution and the fallback misses sigma by a fifth."""
    amplitude = np.zeros((128, 128))
    amplitude[32:96, 32:96] = 200.0
    noisy = root_sum_of_squares(amplitude, 5.0, 4, np.random.default_rng(0))
    four, one = estimate_noise(noisy, coils=4), estimate_noise(noisy)
    assert four.background == pytest.approx(5.0, rel=0.05) and four.tissue == pytest.approx(5.0, rel=0.1)
    assert one.background is None and abs(one.sigma - 5.0) > 0.2 * 5.0


def test_coils_are_checked_and_go_through_the_cli(tmp_path):
    for bad in (0, -1, 1000):
        with pytest.raises(MeddiffError, match="--coils must be"):
            DenoiseSpec(coils=bad)
    assert "4 coils" in DenoiseSpec(coils=4).description() and "coils" not in DenoiseSpec().description()
    amplitude = np.zeros((48, 48), np.float32)
    amplitude[8:40, 8:40] = 100.0
    save_image(Image(root_sum_of_squares(amplitude, 4.0, 4, np.random.default_rng(1)), np.eye(4), "MR"),
               tmp_path / "noisy.nii.gz")
    assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(tmp_path / "out.nii.gz"), "--coils", "4",
                 "--report"]) == 0
    assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(tmp_path / "bad.nii.gz"),
                 "--coils", "0"]) == 2
    assert not (tmp_path / "bad.nii.gz").exists()


def test_adaptation_counts_only_tissue_above_the_floor_of_its_coils():
    """Pure four-coil noise: its mean (2.74 sigma) often passes the one-coil threshold of 3 sigma, never the
    four-coil one, so adapting with --coils 4 finds no tissue to train on."""
    from test_denoise import pipeline_for

    from meddiff.diffusion.noise_level import bright_threshold

    assert bright_threshold(1) == pytest.approx(3.0) and bright_threshold(4) > 4.4
    pipeline = pipeline_for(2, shape=(16, 16))
    noise = Image(root_sum_of_squares(np.zeros((48, 48)), 1.0, 4, np.random.default_rng(2)), np.eye(4), "MR")
    assert not pipeline.adapt(noise, steps=2, noise_sigma=1.0)[1].skipped
    assert pipeline.adapt(noise, steps=2, noise_sigma=1.0, coils=4)[1].skipped
