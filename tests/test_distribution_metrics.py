"""Distribution metrics agree with their reference implementations (MONAI, torchmetrics, prdc, scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff import MeddiffError
from meddiff.metrics import density_coverage, frechet_distance, memorization, paired, precision_recall


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    return rng.standard_normal((300, 16)), rng.standard_normal((250, 16)) * 1.2 + 0.3


def test_frechet_distance_agrees_with_monai_and_torchmetrics(features):
    from monai.metrics import FIDMetric
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = features
    ours = frechet_distance(a, b)
    assert ours == pytest.approx(FIDMetric()(torch.from_numpy(a), torch.from_numpy(b)).item(), rel=1e-6)

    class Identity(torch.nn.Module):  # torchmetrics' FID on given features instead of Inception's
        num_features = a.shape[1]

        def forward(self, x):
            return x

    metric = FrechetInceptionDistance(feature=Identity(), normalize=True)
    metric.set_dtype(torch.float64)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    assert ours == pytest.approx(metric.compute().item(), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_is_stable_for_singular_covariances():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 120)), rng.standard_normal((50, 120)) + 0.1  # rank < dimension
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(sqrtm(cov_a @ cov_b)).real)
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-6)
    assert np.isfinite(frechet_distance(a[:3], b[:3]))


def test_precision_recall_density_coverage_agree_with_prdc(features):
    import prdc

    real, fake = features
    for k in (3, 5):
        expected = prdc.compute_prdc(real, fake, k)
        ours = {**precision_recall(real, fake, k), **density_coverage(real, fake, k)}
        assert ours == pytest.approx({key: float(value) for key, value in expected.items()}, abs=1e-12)


def test_fidelity_and_diversity_separate():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((400, 8))
    collapsed = rng.standard_normal((400, 8)) * 0.2  # faithful but not diverse
    assert precision_recall(real, collapsed)["precision"] > 0.9 and precision_recall(real, collapsed)["recall"] < 0.3
    assert (density_coverage(real, collapsed)["coverage"]
            < density_coverage(real, rng.standard_normal((400, 8)))["coverage"])


def test_memorization_finds_near_copies():
    rng = np.random.default_rng(3)
    train = rng.standard_normal((200, 32))
    fresh = rng.standard_normal((50, 32))
    copies = train[:10] + 0.01 * rng.standard_normal((10, 32))
    result = memorization(train, np.concatenate([copies, fresh]), holdout_feats=rng.standard_normal((50, 32)))
    assert result.near_copy_fraction == pytest.approx(10 / 60)
    np.testing.assert_array_equal(result.nearest[:10], np.arange(10))
    assert result.holdout_ratio > 0.9  # most fakes are new samples: as far from training as held-out data
    assert memorization(train, fresh).near_copy_fraction == 0.0
    with pytest.raises(MeddiffError, match="NaN"):
        memorization(train, np.full((3, 32), np.nan))


def test_paired_metrics_through_monai():
    rng = np.random.default_rng(4)
    reference = rng.random((192, 192))
    result = paired(reference, reference + 0.05 * rng.standard_normal(reference.shape), data_range=1.0)
    assert result["psnr"] == pytest.approx(26.0, abs=0.2) and 0 < result["ssim"] < 1 and 0 < result["ms_ssim"] < 1
    assert paired(reference[:64, :64], reference[:64, :64])["ms_ssim"] is None
    assert paired(reference, reference)["ssim"] == pytest.approx(1.0)


def test_clip_score_is_scaled_clipped_cosine():
    from meddiff.metrics import clip_score

    class Encoder:  # image i and text i embed to fixed vectors with known angles
        def encode_image(self, images):
            return torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])[: len(images)]

        def encode_text(self, texts):
            table = {"same": [2.0, 0.0], "diagonal": [1.0, 1.0], "opposite": [-1.0, 0.0]}
            return torch.tensor([table[t] for t in texts])

    result = clip_score([0, 1, 2], ["same", "diagonal", "opposite"], Encoder())
    assert result["per_item"] == pytest.approx([100.0, 100 / np.sqrt(2), 0.0])
    assert result["clip_score"] == pytest.approx((100 + 100 / np.sqrt(2)) / 3)
    with pytest.raises(MeddiffError, match="one report per image"):
        clip_score([0, 1], ["same"], Encoder())
