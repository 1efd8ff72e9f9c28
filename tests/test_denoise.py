"""Noise-level-matched denoising: geometry and units kept, sliding window, 4D, errors, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff import Image, MeddiffError, load_image
from meddiff.cli.main import main
from meddiff.diffusion.denoise import denoise_tensor
from meddiff.pipeline import DiffusionPipeline
from meddiff.training import DiffusionModule

TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)


class Oracle(torch.nn.Module):
    """An x0-predicting 'network' that returns the noisy image it was shown: denoising becomes the identity,
    so whatever comes out differently was changed by the pipeline's own normalisation or geometry."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.register_buffer("abar", alphas_cumprod.float())
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, timesteps, **_):
        scale = self.abar[timesteps.long()].sqrt().view(-1, *[1] * (x.ndim - 1))
        return x / scale


def pipeline_for(spatial_dims: int, oracle: bool = False, shape=None) -> DiffusionPipeline:
    torch.manual_seed(0)
    shape = shape or (16,) * spatial_dims
    module = DiffusionModule(spatial_dims=spatial_dims, image_shape=shape, prediction="x0" if oracle else "v", **TINY)
    pipeline = module.pipeline(ema=False)
    if oracle:
        pipeline.unet = Oracle(pipeline.schedule.training_scheduler().alphas_cumprod)
    pipeline.unet.eval()
    return pipeline


def noisy(clean: np.ndarray, percent: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigma = percent / 100 * clean.max()
    return np.sqrt((clean + rng.normal(0, sigma, clean.shape)) ** 2 + rng.normal(0, sigma, clean.shape) ** 2).astype(np.float32)


@pytest.mark.parametrize("shape_kind", ["2d", "3d", "4d"])
def test_units_geometry_and_meta_are_kept(dipy_oblique, shape_kind):
    volume = load_image(dipy_oblique, modality="MR")
    array = {"2d": volume.array[:, :, 10], "3d": volume.array, "4d": np.stack([volume.array, volume.array * 0.5], -1)}[shape_kind]
    image = Image(noisy(array, 3), volume.affine, "MR", {"EchoTime": 30.0})
    out = pipeline_for(2, oracle=True).denoise(image)
    np.testing.assert_allclose(out.array, image.array, rtol=1e-5, atol=1e-3 * image.array.max())
    np.testing.assert_array_equal(out.affine, image.affine)
    assert out.modality == "MR" and out.meta == {"EchoTime": 30.0}


def test_sliding_window_equals_whole_volume_when_it_fits():
    pipeline = pipeline_for(3)
    for p in pipeline.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    clean = np.zeros((16, 16, 16), np.float32)
    clean[4:12, 3:13, 2:14] = 100.0
    image = Image(noisy(clean, 5), np.diag([2.0, 2.0, 2.0, 1.0]), "MR")
    out = pipeline.denoise(image, noise_sigma=5.0)
    low, high = 0.0, float(np.percentile(image.array[image.array != 0], 99.5))
    y = torch.from_numpy((image.array - low) / (high - low) * 2 - 1)[None, None]
    whole = denoise_tensor(pipeline.unet, pipeline.schedule, y, 2 * 5.0 / (high - low))[0, 0].numpy()
    np.testing.assert_allclose(out.array, (whole + 1) / 2 * (high - low) + low, rtol=1e-4, atol=1e-3)
    bigger = Image(noisy(np.pad(clean, 6), 5), np.eye(4), "MR")
    assert pipeline.denoise(bigger).array.shape == (28, 28, 28)  # patches of 16^3, blended


def test_sampling_variant_is_seeded():
    pipeline = pipeline_for(2)
    for p in pipeline.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    clean = np.zeros((32, 32), np.float32)
    clean[8:24, 8:24] = 100.0
    image = Image(noisy(clean, 5), np.eye(4), "MR")
    a = pipeline.denoise(image, steps=4, samples=2, seed=1).array
    b = pipeline.denoise(image, steps=4, samples=2, seed=1).array
    c = pipeline.denoise(image, steps=4, samples=2, seed=2).array
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bad_images_are_refused():
    pipeline = pipeline_for(2, oracle=True)
    with pytest.raises(MeddiffError, match="constant"):
        pipeline.denoise(Image(np.zeros((16, 16), np.float32), np.eye(4), "MR"))
    with pytest.raises(MeddiffError, match="NaN"):
        pipeline.denoise(Image(np.full((16, 16), np.nan, np.float32), np.eye(4), "MR"))
    clean = np.zeros((16, 16), np.float32)
    clean[4:12, 4:12] = 10.0
    with pytest.raises(MeddiffError, match="no noise found"):
        pipeline.denoise(Image(clean, np.eye(4), "MR"))


def test_cli_denoises_a_dicom_series_to_nifti(ct_series_dir, tmp_path):
    model = pipeline_for(2).save_pretrained(tmp_path / "model")
    out = tmp_path / "clean.nii.gz"
    assert main(["denoise", "-i", str(ct_series_dir), "-o", str(out), "--model", str(model), "--noise-sigma", "20"]) == 0
    source, result = load_image(ct_series_dir), load_image(out)
    assert result.array.shape == source.array.shape
    np.testing.assert_allclose(result.affine, source.affine, atol=1e-5)
    assert main(["denoise", "-i", str(ct_series_dir), "-o", str(out), "--model", str(model)]) == 2  # exists
    assert main(["denoise", "-i", str(ct_series_dir), "-o", str(tmp_path / "x.nii.gz"), "--model", str(model), "--noise-sigma", "lots"]) == 2
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["denoise", "-i", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "y.nii.gz"), "--model", str(model)]) == 2
    assert not (tmp_path / "x.nii.gz").exists() and not (tmp_path / "y.nii.gz").exists()
