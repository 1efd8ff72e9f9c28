"""Dead-leaves training images, Rician noise and the paired metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff import MeddiffError
from meddiff.data.synthetic import RandDeadLeavesd, dead_leaves, rician_noise
from meddiff.metrics import foreground_mask, psnr, ssim


def test_dead_leaves_cover_the_image_with_flat_discs():
    image = dead_leaves((64, 64), np.random.default_rng(0), max_blur=0.0)
    assert image.shape == (64, 64) and 0.0 <= image.min() and image.max() <= 1.0
    assert (image == 0).mean() < 0.01  # covered, up to the last specks
    assert len(np.unique(image)) > 20  # many discs, each one flat grey level
    assert dead_leaves((16, 16, 16), np.random.default_rng(0)).shape == (16, 16, 16)


def test_rand_dead_leaves_replaces_with_probability_and_is_seeded():
    data = {"image": torch.zeros(2, 32, 32)}
    never = RandDeadLeavesd("image", prob=0.0)
    assert torch.equal(never(data)["image"], data["image"])
    a = RandDeadLeavesd("image", prob=1.0).set_random_state(3)(data)["image"]
    b = RandDeadLeavesd("image", prob=1.0).set_random_state(3)(data)["image"]
    assert torch.equal(a, b) and a.shape == (2, 32, 32) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[0], a[1])  # each channel its own pattern


def test_rician_noise_has_the_rayleigh_background_and_gaussian_tissue():
    rng = np.random.default_rng(0)
    image = np.zeros((200, 200), np.float32)
    image[:, 100:] = 100.0
    noisy = rician_noise(image, 5.0, rng)
    assert abs(noisy[:, :100].mean() - 5.0 * np.sqrt(np.pi / 2)) < 0.1  # Rayleigh mean
    assert abs(noisy[:, 100:].std() - 5.0) < 0.2


def test_psnr_and_ssim_on_a_foreground_mask():
    reference = np.zeros((32, 32))
    reference[8:24, 8:24] = 1.0
    estimate = reference.copy()
    estimate[10, 10] += 0.1
    mask = foreground_mask(reference)
    assert mask.sum() == 256
    assert psnr(reference, estimate, 1.0, mask) == pytest.approx(10 * np.log10(256 / 0.01))
    assert psnr(reference, estimate, 1.0) == pytest.approx(10 * np.log10(1024 / 0.01))
    assert ssim(reference, reference, 1.0, mask) == pytest.approx(1.0)
    assert ssim(reference, estimate, 1.0, mask) < 1.0
    with pytest.raises(MeddiffError, match="differ in shape"):
        psnr(reference, estimate[:8], 1.0)


def test_ssim_and_ms_ssim_match_scikit_image_and_refuse_what_they_cannot_measure():
    from skimage.metrics import structural_similarity

    from meddiff.metrics import ms_ssim

    rng = np.random.default_rng(5)
    reference = rng.random((64, 80))
    estimate = reference + 0.1 * rng.standard_normal(reference.shape)
    expected = structural_similarity(reference, estimate, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert ssim(reference, estimate, 1.0) == pytest.approx(expected, rel=1e-6)
    # singleton axis dropped
    assert ssim(reference[..., None], estimate[..., None], 1.0) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(MeddiffError, match="11 pixels"):
        ssim(reference[:8, :8], estimate[:8, :8], 1.0)
    slab = rng.random((40, 32, 6))  # six thick slices: scored slice by slice in 2D
    noisy_slab = slab + 0.1 * rng.standard_normal(slab.shape)
    per_slice = [structural_similarity(slab[..., k], noisy_slab[..., k], data_range=1.0, gaussian_weights=True,
                                       sigma=1.5, use_sample_covariance=False) for k in range(6)]
    assert ssim(slab, noisy_slab, 1.0) == pytest.approx(np.mean(per_slice), rel=1e-6)
    border = np.zeros(reference.shape, bool)
    border[:3] = True
    with pytest.raises(MeddiffError, match="border"):
        ssim(reference, estimate, 1.0, border)
    big = rng.random((192, 192))
    assert ms_ssim(big, big, 1.0) == pytest.approx(1.0)
    assert ms_ssim(big, big + 0.05 * rng.standard_normal(big.shape), 1.0) < 1.0


def test_rand_dead_leaves_accepts_numpy_images():
    out = RandDeadLeavesd("image", prob=1.0).set_random_state(0)({"image": np.zeros((1, 16, 16), np.float32)})["image"]
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (1, 16, 16) and out.max() > -1


def test_tissue_contrast_keeps_air_dark_and_can_invert_the_tissue_order():
    """A T1-like ramp (dark fluid, bright white matter) comes back with another order of brightness for some
    seeds, air (-1) stays -1, values stay in [-1, 1], and the same seed gives the same curve."""
    from meddiff.data.contrast import RandTissueContrastd

    ramp = torch.linspace(-1.0, 1.0, 64).reshape(1, 8, 8)
    fluid, white = (ramp > -0.5) & (ramp < -0.3), ramp > 0.8
    inverted = 0
    for seed in range(20):
        transform = RandTissueContrastd(["image"], prob=1.0)
        transform.set_random_state(seed)
        out = transform({"image": ramp})["image"]
        assert out[0, 0, 0] == -1.0 and out.min() >= -1.0 and out.max() <= 1.0 + 1e-6
        inverted += bool(out[fluid].mean() > out[white].mean())
        again = RandTissueContrastd(["image"], prob=1.0)
        again.set_random_state(seed)
        assert torch.equal(again({"image": ramp})["image"], out)
    assert 0 < inverted < 20
    untouched = RandTissueContrastd(["image"], prob=0.0)({"image": ramp})["image"]
    assert torch.equal(untouched, ramp)
