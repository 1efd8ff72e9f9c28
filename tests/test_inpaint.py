"""Inpainting without training (RePaint): the plan, the hook, the pipeline on real MRI and CT,
and ``meddiff inpaint``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, RePaintScheduler

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.diffusion.repaint import RePaint, repaint_plan
from meddiff.diffusion.sampling import sample_loop
from meddiff.model import DiffusionModel
from meddiff.pipelines import DiffusionPipeline, load_pipeline
from meddiff.training import DiffusionModule

TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)
FAST = dict(steps=6, resample=2, jump=2, progress=False)


def tiny_pipeline(spatial_dims: int = 2, size: int = 16, spacing: float = 2.0, **kwargs) -> DiffusionPipeline:
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(spatial_dims=spatial_dims, image_shape=(size,) * spatial_dims,
                                       image_spacing=(spacing,) * spatial_dims, **{**TINY, **kwargs})
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return module.pipeline(ema=False)


def t1_slice() -> Image:
    from meddiff.data.samples import dipy_t1_slice

    return dipy_t1_slice()


@pytest.mark.parametrize(("steps", "jump", "resample"), [(50, 10, 5), (20, 1, 3), (10, 10, 4), (12, 5, 1)])
def test_plan_is_diffusers_repaint_schedule(steps, jump, resample):
    """The steps RePaint runs, in order, are those of diffusers' RePaintScheduler (jump_length, jump_n_sample)."""
    reference = RePaintScheduler(num_train_timesteps=1000)
    reference.set_timesteps(steps, jump_length=jump, jump_n_sample=resample)
    downward, last = [], int(reference.timesteps[0]) + 1
    for t in reference.timesteps.tolist():  # a timestep below the last one is a denoising step, above it a jump back
        if t < last:
            downward.append(t)
        last = t
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    ddpm.set_timesteps(steps)
    assert [int(ddpm.timesteps[i]) for i in repaint_plan(steps, jump, resample)] == downward


class Oracle(torch.nn.Module):
    """Predicts x0 = ``target`` whatever it sees: RePaint must then return ``target`` in the masked region."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target = target
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels=None, context=None):
        return self.target.expand_as(x)


def test_hook_keeps_the_known_region_and_an_oracle_fills_the_rest():
    target = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    known = torch.full_like(target, 0.25)
    keep = torch.zeros_like(target, dtype=torch.bool)
    keep[..., :4] = True
    sampler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample", clip_sample=False)
    sampler.set_timesteps(10)
    generator = [torch.Generator().manual_seed(0)]
    repaint = RePaint(known, keep, sampler, jump=3, resample=3, generator=generator)
    seen = []

    def record(position, t, x):
        seen.append(int(t))
        return x

    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    out = sample_loop(lambda x, t: Oracle(target)(x, t), noise, sampler, repaint.timesteps, generator,
                      [repaint, record])
    assert len(seen) == len(repaint.plan) > 10  # the jumps ran steps again
    assert torch.equal(out[keep], known[keep])  # pasted unnoised after the last step
    torch.testing.assert_close(out[~keep], target[~keep])


def test_outside_the_mask_is_the_input_bit_for_bit_and_seeds_decide_the_fill():
    pipeline, image = tiny_pipeline(), t1_slice()
    mask = np.zeros(image.array.shape, bool)
    mask[100:130, 90:140] = True
    first, second = pipeline.inpaint(image, mask, samples=2, seed=3, **FAST)
    again = pipeline.inpaint(image, mask, samples=1, seed=3, **FAST)[0]
    for result in (first, second):
        assert np.array_equal(result.array[~mask], image.array[~mask]) and result.array.dtype == image.array.dtype
        assert np.array_equal(result.affine, image.affine) and result.modality == "MR"
        assert np.isfinite(result.array).all() and not np.allclose(result.array[mask], image.array[mask])
    assert np.array_equal(again.array, first.array) and not np.array_equal(first.array, second.array)


def test_the_fill_comes_back_in_the_input_units_and_grid():
    """An x0 oracle knowing the scan: the filled region is the scan itself, through model units and the model's
    2 mm voxels (the 1 mm slice is resampled there and back), so only the resampling blur remains."""
    from meddiff.pipelines.volumes import intensity_window

    image = t1_slice()
    pipeline = tiny_pipeline(size=128, prediction="x0")
    low, high = intensity_window(pipeline.config, image.array)
    half = torch.nn.functional.interpolate(torch.from_numpy(image.array)[None, None], scale_factor=0.5, mode="bilinear")
    pipeline.unet = Oracle((half - low) / (high - low) * 2 - 1)
    mask = np.zeros(image.array.shape, bool)
    mask[96:160, 96:160] = True
    result = pipeline.inpaint(image, mask, steps=4, resample=1, progress=False)[0]
    error = np.abs(result.array[mask] - image.array[mask]).mean() / image.array.max()
    assert error < 0.03  # bilinear down and up again; a units or geometry slip is far larger


def test_a_2d_model_fills_only_the_slices_the_mask_touches():
    pipeline, clean = tiny_pipeline(), t1_slice().array[64:128, 64:128]
    volume = Image(np.stack([clean, clean * 0.9, clean * 1.1, clean], axis=2), np.diag([2.0, 2.0, 5.0, 1.0]), "MR")
    mask = np.zeros(volume.array.shape, bool)
    mask[20:40, 20:40, 1:3] = True
    result = pipeline.inpaint(volume, mask, **FAST)[0]
    assert np.array_equal(result.array[~mask], volume.array[~mask])
    assert not np.allclose(result.array[:, :, 1][mask[:, :, 1]], volume.array[:, :, 1][mask[:, :, 1]])


class Recorder(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.shapes = unet, []

    def forward(self, x, **kwargs):
        self.shapes.append(tuple(x.shape[2:]))
        self.voxels = getattr(self, "voxels", 0) + x[:, :1].numel()
        return self.unet(x, **kwargs)


def test_a_3d_model_runs_on_tiles_of_its_training_shape():
    pipeline = tiny_pipeline(spatial_dims=3, size=16)
    pipeline.unet = Recorder(pipeline.unet)
    rng = np.random.default_rng(0)
    volume = Image(rng.random((40, 36, 20), dtype=np.float32) * 100, np.diag([2.0, 2.0, 2.0, 1.0]), "MR")
    mask = np.zeros(volume.array.shape, bool)
    mask[10:20, 10:20, 5:10] = True
    result = pipeline.inpaint(volume, mask, **FAST)[0]
    assert np.array_equal(result.array[~mask], volume.array[~mask]) and result.array.shape == volume.array.shape
    assert set(pipeline.unet.shapes) == {(16, 16, 16)}


def test_a_3d_model_fills_a_small_region_of_a_large_volume_from_the_region_around_it():
    """A 30 mm sphere in a 400x400x200 mm volume: the network sees the sphere's neighbourhood (its bounding box
    widened by half the training extent), a small fraction of the volume, at every step."""
    pipeline = tiny_pipeline(spatial_dims=3, size=16)
    pipeline.unet = Recorder(pipeline.unet)
    volume = Image(np.random.default_rng(0).random((200, 200, 100), dtype=np.float32) * 100,
                   np.diag([2.0, 2.0, 2.0, 1.0]), "MR")
    grid = np.ogrid[:200, :200, :100]
    sphere = sum((g - c) ** 2 for g, c in zip(grid, (100, 90, 50), strict=True)) <= 7.5**2  # 15 mm radius
    result = pipeline.inpaint(volume, sphere, steps=3, scheduler="ddim", resample=1, jump=1, progress=False)[0]
    assert np.array_equal(result.array[~sphere], volume.array[~sphere])
    assert not np.array_equal(result.array[sphere], volume.array[sphere])
    per_step = pipeline.unet.voxels / 3
    assert per_step < 0.1 * volume.array.size, per_step  # the whole volume: several times its size


def test_a_mask_on_another_grid_is_resampled_by_geometry():
    from meddiff.pipelines.inpaint import mask_on_grid

    image = Image(np.zeros((40, 40, 10), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), "MR")
    coarse = np.zeros((20, 20, 5), np.uint8)
    coarse[5:10, 5:10, 1:3] = 1
    fill = mask_on_grid(image, Image(coarse, np.diag([2.0, 2.0, 4.0, 1.0]), "MR"))
    # mask voxels 5..9 (2 mm, centres 10..18 mm) and 1..2 (4 mm, centres 4..8 mm): image voxels 9/10..19 and 2/3..4/5
    assert fill.shape == (40, 40, 10) and fill[10:19, 10:19, 3:5].all()
    assert not fill[:9].any() and not fill[:, 20:].any() and not fill[..., 6:].any()
    shifted = Image(coarse, np.array([[2.0, 0, 0, 500], [0, 2.0, 0, 0], [0, 0, 4.0, 0], [0, 0, 0, 1]]), "MR")
    with pytest.raises(MeddiffError, match="does not overlap"):
        mask_on_grid(image, shifted)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (lambda m: m * 0, "mask is empty"),
        (lambda m: m * 0 + 1, "covers the whole image"),
        (lambda m: m * 0.5 + (m > 0) * np.linspace(0, 1, m.shape[1]), "not binary"),
        (lambda m: m * 3 - (m == 0), "not binary"),
        (lambda m: m[:10], "is not the image's"),
    ],
)
def test_bad_masks_are_refused(values, message):
    from meddiff.pipelines.inpaint import mask_on_grid

    image = Image(np.ones((16, 16), np.float32), np.eye(4), "MR")
    mask = np.zeros((16, 16), np.float32)
    mask[4:8, 4:8] = 1
    with pytest.raises(MeddiffError, match=message):
        mask_on_grid(image, values(mask))


def test_models_that_cannot_repaint_are_refused():
    image, mask = Image(np.ones((16, 16), np.float32), np.eye(4), "MR"), np.eye(16, dtype=bool)
    with pytest.raises(MeddiffError, match="low noise levels only"):
        tiny_pipeline(max_train_timestep=100).inpaint(image, mask, **FAST)
    with pytest.raises(MeddiffError, match="multistep"):
        tiny_pipeline().inpaint(image, mask, steps=4, scheduler="dpm++2m", progress=False)
    with pytest.raises(MeddiffError, match="3D model inpaints volumes"):
        tiny_pipeline(spatial_dims=3).inpaint(image, mask, **FAST)


def test_cli_on_a_real_ct_dicom_writes_derived_dicom_and_keeps_the_rest(tmp_path):
    """pydicom's CT_small (real CT, 128x128, integer HU): written back as a DERIVED series of its study,
    exact outside the mask."""
    import pydicom
    from pydicom.data import get_testdata_file

    model = tiny_pipeline(modality="CT", intensity_range=(-1000.0, 1000.0)).save_pretrained(tmp_path / "model")
    source = get_testdata_file("CT_small.dcm")
    image = load_image(source)
    mask = np.zeros(image.array.shape, np.uint8)
    mask[40:70, 50:90] = 1
    save_image(Image(mask, image.affine, "CT"), tmp_path / "mask.nii.gz")
    out = tmp_path / "filled.dcm"
    args = ["inpaint", "-i", source, "--mask", str(tmp_path / "mask.nii.gz"), "-o", str(out), "--model", str(model),
            "--steps", "4", "--resample", "2", "--jump", "2"]
    assert main(args) == 0
    written, original = pydicom.dcmread(out), pydicom.dcmread(source)
    assert (
        "DERIVED" in written.ImageType
        and "inpainted" in written.DerivationDescription
        and written.StudyInstanceUID == original.StudyInstanceUID
        and written.SourceImageSequence[0].ReferencedSOPInstanceUID == original.SOPInstanceUID
    )
    result = load_image(out)
    fill = mask.reshape(result.array.shape).astype(bool)
    # exact at the source's rescale; this random network fills beyond its 16 bits (about -50000..58000 HU), so the
    # writer widens the rescale rather than clip the fill, and the rest comes back within half a stored step
    step = float(written.RescaleSlope)
    assert np.abs(result.array[~fill] - image.array.reshape(result.array.shape)[~fill]).max() <= step / 2
    assert main(args) == 2  # exists: not replaced without --overwrite


def test_an_mr_dicom_comes_back_exactly_outside_the_mask(tmp_path):
    """pydicom's MR_small (whole-number MR): the fill is rounded to whole numbers and the DICOM writer stores
    them as they are, so a DICOM in -> DICOM out round trip keeps every voxel outside the mask."""
    from pydicom.data import get_testdata_file

    model = tiny_pipeline().save_pretrained(tmp_path / "model")
    source = get_testdata_file("MR_small.dcm")
    image = load_image(source)
    fill = np.zeros(image.array.shape, np.uint8)
    fill[20:40, 20:40] = 1
    save_image(Image(fill, image.affine, "MR"), tmp_path / "mask.nii.gz")
    assert main(["inpaint", "-i", source, "--mask", str(tmp_path / "mask.nii.gz"), "-o", str(tmp_path / "out.dcm"),
                 "--model", str(model), "--steps", "3", "--resample", "1"]) == 0
    result = load_image(tmp_path / "out.dcm")
    keep = fill.reshape(result.array.shape) == 0
    assert np.array_equal(result.array[keep], image.array.reshape(result.array.shape)[keep])
    assert np.array_equal(result.array, np.round(result.array))


def test_cli_writes_numbered_samples_and_help_lists_the_verb(tmp_path, capsys):
    model = tiny_pipeline().save_pretrained(tmp_path / "model")
    image = Image(t1_slice().array[64:128, 64:128], np.diag([2.0, 2.0, 2.0, 1.0]), "MR")
    save_image(image, tmp_path / "t1.nii.gz")
    mask = np.zeros(image.array.shape, np.uint8)
    mask[20:40, 20:40] = 255
    save_image(Image(mask, image.affine, "MR"), tmp_path / "mask.nii.gz")
    assert main(["inpaint", "-i", str(tmp_path / "t1.nii.gz"), "--mask", str(tmp_path / "mask.nii.gz"),
                 "-o", str(tmp_path / "f.nii.gz"), "--model", str(model),
                 "--steps", "3", "--resample", "1", "--samples", "2", "--seed", "4"]) == 0
    first, second = load_image(tmp_path / "f_1.nii.gz"), load_image(tmp_path / "f_2.nii.gz")
    assert not np.array_equal(first.array, second.array) and np.array_equal(first.affine, image.affine)
    direct = load_pipeline(model).inpaint(image, mask, steps=3, resample=1, seed=4, progress=False)[0]
    np.testing.assert_array_equal(first.array, direct.array)


def test_old_model_folders_load_unchanged(tmp_path):
    """A folder as meddiff wrote it before components (model.safetensors, no format_version) and the bundled model."""
    import json

    from safetensors.torch import save_file

    pipeline = tiny_pipeline()
    folder = tmp_path / "old"
    folder.mkdir()
    config = pipeline.config.model_dump(mode="json", exclude={"format_version", "denoise_strength", "denoise_tile"})
    config["unet"].pop("in_channels"), config["unet"].pop("out_channels"), config["unet"].pop("cross_attention_dim")
    (folder / "config.json").write_text(json.dumps({**config, "meddiff_version": "0.1.0"}))
    save_file({k: v.contiguous() for k, v in pipeline.unet.state_dict().items()}, folder / "model.safetensors")
    loaded = DiffusionModel.from_pretrained(folder)
    for name, tensor in pipeline.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], tensor)
    bundled = load_pipeline("mri-denoise")
    assert bundled.config.format_version == 1 and bundled.config.denoise_tile == [128, 128]
    newer = json.loads((folder / "config.json").read_text()) | {"format_version": 99}
    (folder / "config.json").write_text(json.dumps(newer))
    with pytest.raises(MeddiffError, match="newer meddiff"):
        DiffusionModel.from_pretrained(folder)
