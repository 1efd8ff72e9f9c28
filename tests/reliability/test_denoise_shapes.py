"""``meddiff denoise`` on every shape a real 2D or 3D image comes in, bad noise arguments, and bounded load.

Shapes: a 2D image stored as (X, Y), (X, Y, 1), (1, X, Y) or (X, 1, Y) at 1 mm isotropic spacing (a
singleton axis is the slice axis whatever the spacing), odd sides, the smallest accepted size and
sizes too small to denoise. Each either works with the input's shape and affine, or ends in one
clean line; nothing but the declared output appears. The load test wraps the UNet and checks that a
512x512 slice only ever reaches the network as tiles of the model's size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import Snapshot, assert_clean_error, run_meddiff, tiny_model_dir

SHAPES = {
    "2D (X, Y)": (37, 53),
    "(X, Y, 1) at 1 mm": (37, 53, 1),
    "(1, X, Y) at 1 mm": (1, 37, 53),
    "(X, 1, Y) at 1 mm": (37, 1, 53),
    "tiny 8x8": (8, 8),
    "tiny (8, 8, 1)": (8, 8, 1),
    "odd volume (21, 19, 5)": (21, 19, 5),
    "4D (24, 20, 1, 2)": (24, 20, 1, 2),
}

TOO_SMALL = {
    "3x3": ((3, 3), "too small"),
    "(3, 3, 1)": ((3, 3, 1), "too small"),
    "1x1": ((1, 1), "constant"),
    "a line (1, 40, 1)": ((1, 40, 1), "too small"),
}


def noisy_image(shape, seed: int = 0):
    """A bright rectangle plus Rician noise at 5 % of its value, 1 mm isotropic, origin off zero."""
    from meddiff import Image

    rng = np.random.default_rng(seed)
    clean = np.zeros(shape, np.float32)
    clean[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape[:3])] = 100.0
    array = np.hypot(clean + rng.normal(0, 5, shape), rng.normal(0, 5, shape)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = (-10.0, 4.0, 2.5)
    return Image(array, affine, "MR")


def write(image, path):
    from meddiff.io import save_image

    return save_image(image, path)


@pytest.mark.parametrize("case", list(SHAPES))
def test_every_shape_denoises_with_its_shape_and_affine(case, workdir, tiny_model):
    from meddiff.io import load_image

    source = load_image(write(noisy_image(SHAPES[case]), workdir / "in.nii.gz"))
    before = Snapshot(workdir)
    result = run_meddiff("denoise", "-i", "in.nii.gz", "-o", "out.nii.gz", "--model", tiny_model)
    assert result.code == 0, result.err
    assert "error" not in result.err
    out = load_image(workdir / "out.nii.gz")
    assert out.array.shape == source.array.shape == SHAPES[case]
    np.testing.assert_allclose(out.affine, source.affine, atol=1e-5)
    assert np.isfinite(out.array).all()
    before.assert_unchanged(allowed=("out.nii.gz",))


def test_the_bundled_model_denoises_a_2d_image_stored_as_x_y_1(workdir):
    """The reported case: (X, Y, 1) at 1 mm isotropic failed with 'Padding size should be less ...'."""
    from meddiff.io import load_image

    write(noisy_image((40, 44, 1)), workdir / "in.nii.gz")
    before = Snapshot(workdir)
    result = run_meddiff("denoise", "-i", "in.nii.gz", "-o", "out.nii.gz")
    assert result.code == 0, result.err
    assert load_image(workdir / "out.nii.gz").array.shape == (40, 44, 1)
    before.assert_unchanged(allowed=("out.nii.gz",))


@pytest.mark.parametrize("case", list(TOO_SMALL))
def test_images_too_small_end_in_one_line(case, workdir, tiny_model):
    shape, fragment = TOO_SMALL[case]
    write(noisy_image(shape), workdir / "in.nii.gz")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("denoise", "-i", "in.nii.gz", "-o", "out.nii.gz", "--model", tiny_model), fragment)
    before.assert_unchanged()


@pytest.mark.parametrize("shape", [(37, 53), (37, 53, 1), (1, 37, 53), (37, 1, 53), (8, 8)], ids=str)
def test_python_api_keeps_shape_and_affine(shape, tiny_model):
    from meddiff.pipelines import load_pipeline

    image = noisy_image(shape)
    out = load_pipeline(tiny_model).denoise(image)
    assert out.array.shape == shape
    np.testing.assert_array_equal(out.affine, image.affine)


BAD_ARGUMENTS = {
    "--noise-sigma inf": (["--noise-sigma", "inf"], "--noise-sigma"),
    "--noise-sigma 1e400": (["--noise-sigma", "1e400"], "--noise-sigma"),
    "--noise-sigma nan": (["--noise-sigma", "nan"], "--noise-sigma"),
    "--noise-sigma -1": (["--noise-sigma", "-1"], "positive"),
    "--noise-sigma 0": (["--noise-sigma", "0"], "positive"),
    "--noise-sigma lots": (["--noise-sigma", "lots"], "--noise-sigma"),
    "--strength 0": (["--strength", "0"], "--strength"),
    "--strength nan": (["--strength", "nan"], "--strength"),
    "--strength inf": (["--strength", "inf"], "--strength"),
    "--steps 0": (["--steps", "0"], "--steps"),
    "--samples -2": (["--samples", "-2"], "--samples"),
    "--coils 0": (["--coils", "0"], "--coils"),
    "--coils 500": (["--coils", "500"], "--coils"),
    "--adapt 0": (["--adapt", "0"], "--adapt"),
    "--adapt 5000": (["--adapt", "5000"], "--adapt"),
    "--noise-map missing file": (["--noise-map", "missing.nii.gz"], "missing.nii.gz"),
    "--noise-map with --steps 3": (["--noise-map", "estimate", "--steps", "3"], "--steps 1"),
    "--noise-map with --noise-sigma": (["--noise-map", "in.nii.gz", "--noise-sigma", "2"], "not both"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_noise_arguments_end_in_one_line(case, workdir, tiny_model):
    extra, fragment = BAD_ARGUMENTS[case]
    write(noisy_image((24, 24)), workdir / "in.nii.gz")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("denoise", "-i", "in.nii.gz", "-o", "out.nii.gz", "--model", tiny_model, *extra),
                       fragment)
    before.assert_unchanged()


@pytest.mark.parametrize("sigma", [float("inf"), float("nan"), -1.0, 0.0])
def test_python_api_refuses_a_bad_noise_sigma(sigma, tiny_model):
    from meddiff import MeddiffError
    from meddiff.pipelines import load_pipeline

    with pytest.raises(MeddiffError, match="positive number"):
        load_pipeline(tiny_model).denoise(noisy_image((24, 24)), noise_sigma=sigma)


class Recorder(torch.nn.Module):
    """The UNet, recording the shape of every batch it is called on."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.shapes = unet, []

    def forward(self, x, **kwargs):
        self.shapes.append(tuple(x.shape))
        return self.unet(x, **kwargs)


def test_a_512x512_slice_reaches_the_network_only_as_tiles_of_the_training_size(tmp_path):
    """Memory stays flat in the image size: a tiny model (self-attention at its lowest level, 16 px
    training shape; on main's code a 512x512 slice asked it for a 32 GiB attention matrix) is never
    shown more than 16x16 pixels, nor more than ``batch_size`` tiles at once."""
    from meddiff import Image
    from meddiff.pipelines import load_pipeline

    pipeline = load_pipeline(tiny_model_dir(tmp_path / "model", channels=(8, 16), norm_num_groups=8,
                                            num_head_channels=8))
    assert any(pipeline.config.unet.attention_levels)
    pipeline.unet = Recorder(pipeline.unet)
    image = Image(noisy_image((512, 512)).array, np.eye(4), "MR")
    out = pipeline.denoise(image, noise_sigma=5.0, batch_size=256)
    assert out.array.shape == (512, 512) and np.isfinite(out.array).all()
    assert pipeline.unet.shapes and max(s[0] for s in pipeline.unet.shapes) <= 256
    assert {s[2:] for s in pipeline.unet.shapes} == {(16, 16)}
    # every pixel is covered: MONAI's scan (stride 12 px) over 512 px -> 43 tiles per side
    assert sum(s[0] for s in pipeline.unet.shapes) == 43 * 43
