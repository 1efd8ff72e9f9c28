"""A 4D series with its other volumes as context (``meddiff denoise --across-volumes``)."""

from __future__ import annotations

import numpy as np
import pytest
from test_denoise import pipeline_for

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.diffusion.across_volumes import predict_from_other_volumes


def series(volumes: int = 6, sigma: float = 5.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(clean, noisy): one anatomy seen ``volumes`` times at different contrasts, independent Gaussian noise."""
    rng = np.random.default_rng(seed)
    anatomy = np.zeros((40, 40, 4))
    anatomy[8:32, 8:32] = 100.0
    anatomy[14:22, 12:28] = 40.0
    clean = np.stack([anatomy * (1.0 - 0.08 * v) for v in range(volumes)], axis=-1)
    return clean, clean + rng.normal(0.0, sigma, clean.shape)


def test_each_volume_is_predicted_from_the_others_with_the_noise_its_weights_carry():
    """Six contrasts of one anatomy: the prediction's error is the others' noise through the weights (sigma times
    their norm, about 1 / sqrt(5) for five equal others), far below the volume's own noise."""
    clean, noisy = series(sigma=5.0)
    prediction, gain, residual = predict_from_other_volumes(noisy)
    assert prediction.shape == noisy.shape and prediction.dtype == np.float32 and gain.shape == (6,)
    for v in range(6):
        error = float((prediction[..., v] - clean[..., v]).std())
        assert error == pytest.approx(5.0 * gain[v], rel=0.15)
        assert error < 0.6 * 5.0
        assert residual[v] == pytest.approx(5.0 * np.hypot(1.0, gain[v]), rel=0.1)  # explained: noise alone
    unexplained = noisy.copy()
    unexplained[..., 0] = np.flip(unexplained[..., 0], axis=0) ** 2 / 100.0  # another contrast and place
    assert predict_from_other_volumes(unexplained)[2][0] > 2.0 * 5.0
    with pytest.raises(MeddiffError, match="at least 3 volumes"):
        predict_from_other_volumes(noisy[..., :2])
    with pytest.raises(MeddiffError, match="4D series"):
        predict_from_other_volumes(noisy[..., 0])


def test_across_volumes_keeps_the_series_and_beats_volume_by_volume_with_an_oracle_network():
    """With a network that returns what it is shown, denoising is the identity: volume by volume gives the noisy
    series back, across volumes gives the prediction from the others, which is closer to the clean series."""
    pipeline = pipeline_for(2, oracle=True, shape=(16, 16))
    clean, noisy = series(sigma=5.0, seed=1)
    image = Image(np.abs(noisy).astype(np.float32), np.diag([0.8, 0.8, 2.0, 1.0]), "MR")
    plain = pipeline.denoise(image, progress=False, rician_correction=False).array
    across = pipeline.denoise(image, progress=False, rician_correction=False, across_volumes=True).array
    assert across.shape == image.array.shape
    tissue = clean > 0  # the background is |noise|, which no regression makes zero
    assert np.abs(across - clean)[tissue].mean() < 0.7 * np.abs(plain - clean)[tissue].mean()
    mask = np.zeros(image.array.shape[:3], bool)
    mask[10:30, 10:30] = True
    masked = pipeline.denoise(image, progress=False, rician_correction=False, across_volumes=True, mask=mask).array
    np.testing.assert_array_equal(masked[~mask], image.array[~mask])
    with pytest.raises(MeddiffError, match="at least 3 volumes"):
        pipeline.denoise(Image(image.array[..., 0], image.affine, "MR"), across_volumes=True, progress=False)
    with pytest.raises(MeddiffError, match="--noise-map"):
        pipeline.denoise(image, across_volumes=True, local_noise=True, progress=False)


def test_cli_denoises_a_4d_series_across_volumes(tmp_path):
    _, noisy = series(volumes=4, sigma=4.0, seed=2)
    save_image(Image(np.abs(noisy).astype(np.float32), np.eye(4), "MR"), tmp_path / "dwi.nii.gz")
    assert main(["denoise", "-i", str(tmp_path / "dwi.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
                 "--across-volumes"]) == 0
    assert load_image(tmp_path / "out.nii.gz").array.shape == (40, 40, 4, 4)
    assert main(["denoise", "-i", str(tmp_path / "dwi.nii.gz"), "-o", str(tmp_path / "three.nii.gz"),
                 "--across-volumes", "--noise-map", "estimate"]) == 2
    assert not (tmp_path / "three.nii.gz").exists()
