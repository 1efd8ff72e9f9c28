"""Per-scan adaptation (``meddiff denoise --adapt``): Recorrupted-to-Recorrupted fine-tuning on the scan itself,
held-out tiles the training never sees, kept only when it helps, the user's model left untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_denoise import noisy, pipeline_for

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.diffusion.adapt import ALPHA, r2r_loss, split_tiles, tile_side
from meddiff.diffusion.schedulers import NoiseSchedule


class Shrink(torch.nn.Module):
    """An x0-predicting 'network' that returns ``c`` times the image it was shown (``x_t / sqrt(abar)``)."""

    def __init__(self, alphas_cumprod: torch.Tensor, c: float):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.float())
        self.c = c

    def forward(self, x, timesteps, **_):
        return self.c * x / self.abar[timesteps.long()].sqrt().view(-1, *[1] * (x.ndim - 1))


def test_the_r2r_loss_ranks_networks_as_the_error_against_the_clean_image_does():
    """R2R's point: from noisy data alone, the loss minus a constant estimates the squared error against the clean
    image. With Gaussian noise and shrinkage networks, the measured loss matches that error plus
    (1 + 1 / alpha^2) sigma^2, and the best shrinkage by the loss is the best against the clean image."""
    schedule = NoiseSchedule(prediction="x0")
    abar = schedule.training_scheduler().alphas_cumprod
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(64, 1, 32, 32, generator=generator) - 0.5
    sigma = 0.2
    tiles = torch.cat([clean + sigma * torch.randn(clean.shape, generator=generator), torch.ones_like(clean)], 1)
    losses, errors = {}, {}
    for c in (0.3, 0.5, 0.7, 1.0):
        network = Shrink(abar, c)
        losses[c] = r2r_loss(network, schedule, tiles, sigma, 1.0, torch.Generator().manual_seed(1)).item()
        errors[c] = float(((c * clean) ** 2).mean() - 2 * c * (clean**2).mean() + (clean**2).mean()
                          + c**2 * (1 + ALPHA**2) * sigma**2)
        assert losses[c] == pytest.approx(errors[c] + (1 + 1 / ALPHA**2) * sigma**2, rel=0.03)
    assert min(losses, key=losses.get) == min(errors, key=errors.get)


def test_held_out_voxels_are_never_in_the_training_tiles():
    """Every voxel is numbered: the held-out tiles' numbers never appear in a training tile, for a single plane
    (every fourth tile held out) and for a volume (every fifth plane)."""
    for shape in ((1, 64, 64), (7, 32, 32)):
        planes = torch.arange(np.prod(shape), dtype=torch.float64).reshape(shape)
        side = tile_side(planes, 4)
        training, held_out = split_tiles(planes, torch.ones(shape, dtype=torch.float64), side)
        assert len(training) and len(held_out)
        assert not set(training[:, 0].flatten().tolist()) & set(held_out[:, 0].flatten().tolist())
    assert tile_side(torch.zeros(1, 64, 64), 4) == 32 and tile_side(torch.zeros(9, 256, 256), 4) == 64


def test_adapting_keeps_only_what_lowers_the_held_out_loss_and_leaves_the_model_alone():
    """A random tiny network on a noisy square: the result is either kept with a lower held-out loss or the
    prior itself; the pipeline the user holds keeps its weights; the same seed adapts the same way."""
    pipeline = pipeline_for(2, shape=(16, 16))
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    clean = np.zeros((48, 48), np.float32)
    clean[8:40, 8:40] = 100.0
    clean[20:28, 20:28] = 60.0
    image = Image(noisy(clean, 5), np.eye(4), "MR")
    adapted, adaptation = pipeline.adapt(image, steps=12)
    assert adaptation.steps == 12 and not adaptation.skipped
    if adaptation.kept:
        assert adaptation.held_out_after < adaptation.held_out_before and 1 <= adaptation.best_step <= 12
        assert adapted.unet is not pipeline.unet
    else:
        assert adapted.unet is pipeline.unet and adaptation.held_out_after == adaptation.held_out_before
    for key, value in pipeline.unet.state_dict().items():
        torch.testing.assert_close(value, before[key])
    again, repeat = pipeline.adapt(image, steps=12)
    assert repeat.held_out_after == pytest.approx(adaptation.held_out_after)
    np.testing.assert_allclose(again.denoise(image, progress=False).array,
                               adapted.denoise(image, progress=False).array, rtol=1e-5, atol=1e-4)


def test_a_scan_without_tissue_above_the_noise_is_not_adapted():
    pipeline = pipeline_for(2, shape=(16, 16))
    air = Image(noisy(np.zeros((32, 32), np.float32) + 1e-3, 5) + 1.0, np.eye(4), "MR")
    adapted, adaptation = pipeline.adapt(air, steps=5, noise_sigma=1.0)
    assert adaptation.skipped and not adaptation.kept and adapted.unet is pipeline.unet
    assert adaptation.describe().startswith("not adapted: too little tissue")


def test_adapt_refuses_bad_steps_and_3d_models():
    pipeline = pipeline_for(2, shape=(16, 16))
    image = Image(noisy(np.full((32, 32), 100.0, np.float32), 5), np.eye(4), "MR")
    for steps in (0, -3, 10_000, True):
        with pytest.raises(MeddiffError, match="--adapt takes 1 to"):
            pipeline.adapt(image, steps=steps)
    with pytest.raises(MeddiffError, match="2D denoising models"):
        pipeline_for(3).adapt(Image(noisy(np.full((16, 16, 16), 100.0, np.float32), 5), np.eye(4), "MR"), steps=2)


def test_bundled_prior_adapted_to_an_unseen_real_slice_denoises_it_better(tmp_path):
    """The bundled model on a 128x128 crop of pydicom-data's shoulder MR (never trained on) at 9 % Rician noise:
    40 adaptation steps, then denoising at the sigma they adapted at, gain over the prior as is (measured 27.73 ->
    27.99 dB; asserted > 0) and are kept."""
    from meddiff.data.samples import pydicom_data_image
    from meddiff.metrics import foreground_mask, psnr
    from meddiff.pipelines import load_pipeline

    shoulder = pydicom_data_image("MR2_UNCR.dcm")().array.squeeze().reshape(256, 4, 256, 4).mean(axis=(1, 3))
    clean = shoulder[64:192, 64:192].astype(np.float32)
    peak, mask = float(clean.max()), foreground_mask(clean)
    image = Image(noisy(clean, 9, seed=9), np.eye(4), "MR")
    pipeline = load_pipeline("mri-denoise")
    adapted, adaptation = pipeline.adapt(image)
    assert adaptation.kept, adaptation.describe()
    plain = psnr(clean, pipeline.denoise(image, progress=False).array, peak, mask)
    better = psnr(clean, adapted.denoise(image, progress=False, noise_sigma=adaptation.sigma).array, peak, mask)
    assert better > plain


def test_cli_adapt_prints_what_it_did_and_records_it_in_the_report(tmp_path, capsys):
    clean = np.zeros((48, 48), np.float32)
    clean[6:42, 6:42] = 100.0
    clean[18:30, 10:38] = 40.0
    save_image(Image(noisy(clean, 5), np.diag([0.9, 0.9, 1.0, 1.0]), "MR"), tmp_path / "noisy.nii.gz")
    out = tmp_path / "out.nii.gz"
    argv = ["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(out), "--report", "--adapt", "10"]
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "adapt" in said.splitlines()[0]
    report = json.loads((tmp_path / "out.nii.gz.report.json").read_text())
    adaptation = report["adaptation"]
    assert adaptation["steps"] == 10 and isinstance(adaptation["kept"], bool) and adaptation["sigma"] > 0
    if adaptation["kept"]:  # the output was denoised at the sigma the network adapted at
        assert report["spec"]["noise_sigma"] == pytest.approx(adaptation["sigma"])
    assert load_image(out).array.shape == (48, 48)
    for bad in ("0", "-1", "x"):
        assert main(["denoise", "-i", str(tmp_path / "noisy.nii.gz"), "-o", str(tmp_path / f"b{bad}.nii.gz"),
                     "--adapt", bad]) == 2
        assert not (tmp_path / f"b{bad}.nii.gz").exists()
