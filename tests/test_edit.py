"""Editing (SDEdit): the steps run against diffusers' img2img, strength, masks, seeds, conditioning, and
``meddiff edit``."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from test_core_reference import StubTextEncoder, StubUNet
from test_inpaint import t1_slice, tiny_pipeline

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.data.transforms import to_model_range
from meddiff.model import AutoencoderConfig, DiffusionModel, TextEncoderConfig
from meddiff.pipelines import DiffusionPipeline, load_pipeline
from meddiff.pipelines.edit import check_editable, edit_timesteps
from meddiff.pipelines.generate import initial_noise
from meddiff.pipelines.volumes import intensity_window

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # the tiny models' voxel size: no resampling


def mr_slice(size: int = 32) -> Image:
    """A real T1 slice at the tiny models' 2 mm, as floats (so nothing is rounded back to whole numbers)."""
    return Image(t1_slice().array[96:96 + 2 * size:2, 96:96 + 2 * size:2] + 0.25, AFFINE, "MR")


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "euler", "dpm++2m", "unipc"])
@pytest.mark.parametrize(("steps", "strength"), [(20, 0.5), (10, 0.3), (50, 1.0), (8, 0.125)])
def test_the_steps_run_are_diffusers_img2img_timesteps(scheduler, steps, strength):
    """Where strength x steps is whole, the steps are those diffusers' ``get_timesteps`` keeps (it rounds down)."""
    schedule = tiny_pipeline().schedule
    ours, theirs = schedule.scheduler(scheduler), schedule.scheduler(scheduler)
    ours.set_timesteps(steps), theirs.set_timesteps(steps)
    reference, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=theirs), steps, strength,
                                                                "cpu")
    assert edit_timesteps(ours, steps, strength).tolist() == reference.tolist()
    assert getattr(ours, "begin_index", None) == getattr(theirs, "begin_index", None)  # where multistep ones start


def test_a_strength_below_one_step_still_runs_one():
    sampler = tiny_pipeline().schedule.scheduler("ddim")
    sampler.set_timesteps(50)
    assert edit_timesteps(sampler, 50, 1e-3).tolist() == [int(sampler.timesteps[-1])]


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++2m"])
def test_the_edit_is_diffusers_img2img_loop(scheduler):
    """The loop of diffusers' img2img pipeline, written out (noise the input with the scheduler's ``add_noise`` at the
    first kept timestep, then scale, predict, step): the same result as ``pipe.edit`` from the same seed."""
    pipe, image = tiny_pipeline(prediction="v"), mr_slice(16)
    ours = pipe.edit(image, strength=0.6, steps=10, scheduler=scheduler, seed=7, progress=False)[0]
    low, high = intensity_window(pipe.config, image.array)
    sampler = pipe.schedule.scheduler(scheduler)
    sampler.set_timesteps(10)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sampler), 10, 0.6, "cpu")
    noise, _ = initial_noise(pipe.model, [7], [16, 16])
    x = sampler.add_noise(to_model_range(torch.from_numpy(image.array), low, high)[None, None], noise, timesteps[:1])
    for t in timesteps:
        prediction = pipe.unet(sampler.scale_model_input(x, t), timesteps=t.expand(1))
        x = sampler.step(prediction, t, x).prev_sample
    torch.testing.assert_close(to_model_range(torch.from_numpy(ours.array), low, high), x[0, 0], atol=1e-4, rtol=1e-4)


def test_strength_one_of_a_rectified_flow_model_is_a_plain_generate_from_the_same_noise():
    """Rectified flow's first step is pure noise: the input is gone, and the edit is the sample of that seed."""
    pipe, image = tiny_pipeline(schedule="rflow", prediction="v"), mr_slice(16)
    edited = pipe.edit(image, strength=1.0, steps=6, seed=3, progress=False)[0]
    low, high = intensity_window(pipe.config, image.array)
    sample = pipe.sample([3], steps=6)[0, 0]
    torch.testing.assert_close(to_model_range(torch.from_numpy(edited.array), low, high), sample, atol=1e-4, rtol=1e-4)


def test_low_strength_stays_close_to_the_input_and_high_strength_does_not():
    pipe, image = tiny_pipeline(), mr_slice()
    scale = image.array.max()
    close = pipe.edit(image, strength=1e-3, progress=False)[0]
    far = pipe.edit(image, strength=0.8, progress=False)[0]
    near, away = (np.abs(result.array - image.array).mean() / scale for result in (close, far))
    assert near < 0.01 and away > 10 * near  # one step at the last timestep: the input and a trace of its noise
    assert np.array_equal(close.affine, image.affine) and close.modality == "MR"


def test_a_masked_edit_changes_inside_keeps_outside_bit_for_bit_and_seeds_decide_it():
    pipe, image = tiny_pipeline(), t1_slice()  # 1 mm voxels: edited at the model's 2 mm and brought back
    mask = np.zeros(image.array.shape, bool)
    mask[100:130, 90:140] = True
    options = dict(strength=1.0, steps=4, scheduler="ddpm", progress=False)
    first, second = pipe.edit(image, mask=mask, samples=2, seed=3, **options)
    again = pipe.edit(image, mask=mask, seed=3, **options)[0]
    for result in (first, second):
        assert np.array_equal(result.array[~mask], image.array[~mask]) and result.array.dtype == image.array.dtype
        assert np.isfinite(result.array).all() and not np.allclose(result.array[mask], image.array[mask])
    assert np.array_equal(again.array, first.array) and not np.array_equal(first.array, second.array)


def test_a_2d_model_edits_the_slices_of_a_volume_with_per_slice_seeds_whatever_the_batch():
    pipe, clean = tiny_pipeline(), mr_slice().array
    volume = Image(np.stack([clean, clean * 0.9, clean * 1.1], axis=2), np.diag([2.0, 2.0, 5.0, 1.0]), "MR")
    whole = pipe.edit(volume, strength=0.5, steps=6, seed=2, batch_size=3, progress=False)[0]
    one_by_one = pipe.edit(volume, strength=0.5, steps=6, seed=2, batch_size=1, progress=False)[0]
    assert whole.array.shape == volume.array.shape
    np.testing.assert_allclose(whole.array, one_by_one.array, rtol=1e-5, atol=1e-5)  # the same noise; float sums
    mask = np.zeros(volume.array.shape, bool)
    mask[4:20, 4:20, 1] = True
    masked = pipe.edit(volume, mask=mask, strength=0.5, steps=6, seed=2, progress=False)[0]
    assert np.array_equal(masked.array[~mask], volume.array[~mask])


def test_a_class_label_passes_through():
    pipe, image = tiny_pipeline(num_class_embeds=2), mr_slice(16)
    zero, one = (pipe.edit(image, strength=0.7, steps=6, class_label=c, progress=False)[0] for c in (0, 1))
    assert not np.allclose(zero.array, one.array)
    with pytest.raises(MeddiffError, match="class-conditioned"):
        pipe.edit(image, strength=0.7, progress=False)


def test_a_report_guidance_and_negative_prompt_pass_through():
    """An x0 stub that predicts its context's mean: DDIM ends on the guided prediction, uncond + g (cond - uncond),
    whatever the strength; outside the mask the input stays."""
    config = tiny_pipeline(prediction="x0").config.model_copy(update={"text_encoder": TextEncoderConfig(spec="stub")})
    pipe = DiffusionPipeline(DiffusionModel(config, {"unet": StubUNet()}, text_encoder=StubTextEncoder()))
    image = mr_slice(16)
    low, high = intensity_window(config, image.array)
    mask = np.zeros(image.array.shape, bool)
    mask[4:12, 4:12] = True
    edited = pipe.edit(image, mask=mask, strength=0.4, steps=5, prompt="abcdef", guidance_scale=2.5,
                       negative_prompt="a", progress=False)[0]
    guided = to_model_range(torch.from_numpy(edited.array[mask]), low, high)
    torch.testing.assert_close(guided, torch.full_like(guided, 1 + 2.5 * (6 - 1)))
    assert np.array_equal(edited.array[~mask], image.array[~mask])
    with pytest.raises(MeddiffError, match="report-conditioned"):
        pipe.edit(image, strength=0.4, progress=False)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, float("nan"), float("inf")])
def test_a_strength_outside_zero_to_one_is_refused(strength):
    with pytest.raises(MeddiffError, match=r"--strength must be a number in \(0, 1\]"):
        tiny_pipeline().edit(mr_slice(16), strength=strength)


def test_models_and_inputs_that_cannot_be_edited_are_refused():
    image = mr_slice(16)
    with pytest.raises(MeddiffError, match="low noise levels only"):
        tiny_pipeline(max_train_timestep=100).edit(image, strength=0.5, progress=False)
    config = tiny_pipeline().config
    with pytest.raises(MeddiffError, match="latent model"):
        check_editable(config.model_copy(update={"autoencoder": AutoencoderConfig()}))
    with pytest.raises(MeddiffError, match="condition image"):
        check_editable(config.model_copy(update={"unet": config.unet.model_copy(update={"concat_channels": 2})}))
    mask = np.zeros(image.array.shape, bool)
    mask[2:6, 2:6] = True
    with pytest.raises(MeddiffError, match="--scheduler ddpm or ddim"):
        tiny_pipeline().edit(image, mask=mask, strength=0.5, scheduler="dpm++2m", progress=False)
    with pytest.raises(MeddiffError, match="rectified-flow"):
        tiny_pipeline(schedule="rflow", prediction="v").edit(image, mask=mask, strength=0.5, progress=False)
    with pytest.raises(MeddiffError, match="is not the image's"):
        tiny_pipeline().edit(image, mask=mask[:8], strength=0.5, progress=False)
    nan = Image(np.where(mask, np.nan, image.array).astype(np.float32), AFFINE, "MR")
    with pytest.raises(MeddiffError, match="NaN"):
        tiny_pipeline().edit(nan, strength=0.5, progress=False)


def test_cli_writes_numbered_edits_each_with_its_provenance(tmp_path, capsys):
    model = tiny_pipeline().save_pretrained(tmp_path / "model")
    image = mr_slice()
    save_image(image, tmp_path / "t1.nii.gz")
    assert main(["edit", "-i", str(tmp_path / "t1.nii.gz"), "-o", str(tmp_path / "e.nii.gz"), "--model", str(model),
                 "--strength", "0.5", "--steps", "6", "--samples", "2", "--seed", "4"]) == 0
    first, second = load_image(tmp_path / "e_1.nii.gz"), load_image(tmp_path / "e_2.nii.gz")
    assert not np.array_equal(first.array, second.array) and np.array_equal(first.affine, image.affine)
    direct = load_pipeline(model).edit(image, strength=0.5, steps=6, seed=4, progress=False)[0]
    np.testing.assert_array_equal(first.array, direct.array)
    record = json.loads((tmp_path / "e_2.nii.gz.json").read_text())
    assert record["input_sha256"] == hashlib.sha256((tmp_path / "t1.nii.gz").read_bytes()).hexdigest()
    assert record["output_sha256"] == hashlib.sha256((tmp_path / "e_2.nii.gz").read_bytes()).hexdigest()
    assert (record["strength"], record["steps"], record["scheduler"], record["seed"], record["sample"]) == (
        0.5, 6, "ddim", 4, 2)
    assert record["weights_sha256"] == load_pipeline(model).model.weights_sha256
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "edit" in capsys.readouterr().out


def test_cli_on_a_real_mr_dicom_writes_a_derived_series_that_records_the_edit(tmp_path):
    """pydicom's MR_small: a derived object of its study whose DerivationDescription names the strength, model, seed
    and the input's SHA-256; outside the mask every stored value comes back."""
    import pydicom
    from pydicom.data import get_testdata_file

    model = tiny_pipeline().save_pretrained(tmp_path / "model")
    source = get_testdata_file("MR_small.dcm")
    image = load_image(source)
    fill = np.zeros(image.array.shape, np.uint8)
    fill[20:40, 20:40] = 1
    save_image(Image(fill, image.affine, "MR"), tmp_path / "mask.nii.gz")
    out = tmp_path / "edited.dcm"
    assert main(["edit", "-i", source, "--mask", str(tmp_path / "mask.nii.gz"), "-o", str(out), "--model", str(model),
                 "--strength", "0.5", "--steps", "4", "--seed", "9"]) == 0
    written, original = pydicom.dcmread(out), pydicom.dcmread(source)
    description = written.DerivationDescription
    assert "DERIVED" in written.ImageType and written.StudyInstanceUID == original.StudyInstanceUID
    digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
    assert all(part in description for part in ("SDEdit", "strength 0.5", "seed 9", digest,
                                                load_pipeline(model).model.weights_sha256[:16]))
    result = load_image(out)
    keep = fill.reshape(result.array.shape) == 0
    assert np.array_equal(result.array[keep], image.array.reshape(result.array.shape)[keep])
