"""Inpainting models that start from the classical fill: ``conditioning.prefill`` "biharmonic" puts the region
filled by biharmonic inpainting into the condition, and the model learns (and samples) only the residual."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from skimage.restoration import inpaint_biharmonic

from meddiff import Image, MeddiffError
from meddiff.data.masks import CONDITION_KEY, RandInpaintMaskd, inpaint_condition, prefilled
from meddiff.model import DiffusionModel, ModelConfig
from meddiff.pipelines.volumes import intensity_window
from meddiff.training import DiffusionModule

TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)
PREFILLED = dict(conditioning={"concat_key": CONDITION_KEY, "prefill": "biharmonic"})


def prefill_module(size: int = 16, **kwargs) -> DiffusionModule:
    """A tiny 2D inpainting module with the biharmonic prefill: v-prediction on the cosine schedule, as the
    bundled recipes train."""
    arguments = dict(image_shape=(size, size), image_spacing=(1.0, 1.0), concat_channels=2, task="inpaint",
                     prediction="v", beta_schedule="cosine", **TINY, **PREFILLED)
    return DiffusionModule.from_flat(**{**arguments, **kwargs})


def brain_slice() -> np.ndarray:
    """The dipy T1 slice in model units, channel first."""
    from meddiff.data.samples import dipy_t1_slice

    array = dipy_t1_slice().array
    return (array / array.max() * 2 - 1)[None].astype(np.float32)


def region(shape, box) -> np.ndarray:
    fill = np.zeros(shape, bool)
    fill[box] = True
    return fill


def test_prefilled_fills_the_region_and_keeps_the_rest_bit_for_bit():
    image = torch.from_numpy(brain_slice())  # (1, H, W): one item
    fill = torch.from_numpy(region(image.shape, np.s_[:, 90:140, 100:150]))
    out = prefilled(image, fill)
    assert out.dtype == image.dtype and torch.equal(out[~fill], image[~fill])
    expected = inpaint_biharmonic(image[0].numpy(), fill[0].numpy())
    np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
    inside = out[fill]
    assert inside.std() > 0 and image[~fill].min() <= inside.min() and inside.max() <= image[~fill].max()
    batch = torch.stack([image[0], image[0].flip(0), image[0]])  # items filled each on its own
    masks = torch.stack([fill[0], fill[0], torch.zeros_like(fill[0])])
    both = prefilled(batch, masks)
    assert torch.equal(both[0], out[0]) and not torch.equal(both[1], out[0])
    assert torch.equal(both[2], batch[2])  # an empty region: unchanged
    assert torch.equal(prefilled(image, torch.ones_like(fill)), torch.zeros_like(image))  # nothing known: 0
    with pytest.raises(MeddiffError, match="2D items"):
        prefilled(torch.zeros(1, 8, 8, 8), torch.ones(1, 8, 8, 8, dtype=torch.bool))


def test_the_data_builds_the_prefilled_condition():
    image = torch.from_numpy(brain_slice())
    transform = RandInpaintMaskd(prefill="biharmonic")
    transform.set_random_state(3)
    item = transform({"image": image})
    mask = item["inpaint_mask"]
    condition = item[CONDITION_KEY]
    torch.testing.assert_close(condition[1], mask[0])
    assert torch.equal(condition[0], prefilled(image, mask > 0.5)[0])
    batched = inpaint_condition(image[None], mask[None], channel_dim=1, prefill="biharmonic")
    assert torch.equal(batched[0], condition)  # the same condition for a batch (N, 1, H, W) as for one item
    with pytest.raises(MeddiffError, match="prefill"):
        RandInpaintMaskd(prefill="telea")


def zero_output(module: DiffusionModule) -> None:
    """Random weights (a network that sees its input) whose last convolution is zero: it predicts v = 0."""
    torch.manual_seed(0)
    for p in module.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    last = [m for m in module.unet.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    torch.nn.init.zeros_(last.weight), torch.nn.init.zeros_(last.bias)


@pytest.mark.parametrize(("shape", "spacing"), [((37, 30), 1.0), ((40, 34), 0.5)])
def test_a_network_that_predicts_no_residual_gives_the_biharmonic_fill(shape, spacing):
    """Never below classical: with prefill, an untrained network (v = 0) at 1 step returns the biharmonic fill,
    through padding and tiles (37 x 30 on a 16 x 16 model) and through the resize to the model's voxel size."""
    module = prefill_module(size=16)
    zero_output(module)
    pipeline = module.pipeline(ema=False)
    assert pipeline.config.inpaint_prefill == "biharmonic"
    truth = np.random.default_rng(0).random(shape, dtype=np.float32) * 100 + 50
    fill = region(shape, np.s_[10:25, 8:20])
    image = Image(truth, np.diag([spacing, spacing, 1.0, 1.0]), "MR")
    result = pipeline.inpaint(image, fill, steps=1, progress=False)[0].array
    assert np.array_equal(result[~fill], truth[~fill])
    low, high = intensity_window(pipeline.config, truth)  # biharmonic commutes with the affine map to model units
    np.testing.assert_allclose(result[fill], inpaint_biharmonic(truth, fill)[fill], atol=1e-3 * (high - low))


class ConditionRecorder(torch.nn.Module):
    """Predicts v = 0 and records the condition channels it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels=None, context=None):
        self.seen.append(x[:, 1:].clone())
        return torch.zeros_like(x[:, :1])


def test_the_pipeline_conditions_on_the_prefill_of_the_input():
    pipeline = prefill_module(size=32).pipeline(ema=False)
    pipeline.unet = recorder = ConditionRecorder()
    truth = np.random.default_rng(1).random((32, 32), dtype=np.float32)
    fill = region(truth.shape, np.s_[5:20, 12:30])
    pipeline.inpaint(Image(truth, np.eye(4), "MR"), fill, steps=1, progress=False)
    low, high = intensity_window(pipeline.config, truth)
    known = torch.from_numpy((truth - low) / (high - low) * 2 - 1)[None]
    seen = recorder.seen[0][0]
    torch.testing.assert_close(seen[0], prefilled(known, torch.from_numpy(fill)[None])[0], atol=1e-6, rtol=0)
    assert torch.equal(seen[1].bool(), torch.from_numpy(fill))


def test_the_loss_with_prefill_learns_the_residual():
    module = prefill_module(size=16)
    torch.manual_seed(0)
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.05)
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    mask = torch.from_numpy(region((2, 1, 16, 16), np.s_[:, :, 4:11, 3:9])).float()
    condition = inpaint_condition(image, mask, channel_dim=1, prefill="biharmonic")
    batch = {"image": image, CONDITION_KEY: condition}

    def by_hand(x0: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        noise = torch.randn(x0.shape, generator=generator)
        t = module.schedule.draw_timesteps(2, generator, x0.device, None)
        xt, target = module.schedule.noised_and_target(x0, noise, t)
        prediction = module.unet(torch.cat([xt, condition], dim=1), timesteps=t)
        return torch.nn.functional.mse_loss(prediction, target)

    loss = module.loss(batch, torch.Generator().manual_seed(7))
    residual = image - condition[:, :1]
    assert torch.equal(residual * (1 - mask), torch.zeros_like(image))  # no residual outside the region
    torch.testing.assert_close(loss, by_hand(residual))
    assert not torch.allclose(loss, by_hand(image))


def test_training_refuses_data_whose_condition_is_not_the_models():
    module = prefill_module(size=16)
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    mask = torch.from_numpy(region((2, 1, 16, 16), np.s_[:, :, 4:11, 3:9])).float()
    plain = {"image": image, CONDITION_KEY: inpaint_condition(image, mask, channel_dim=1)}
    with pytest.raises(MeddiffError, match="RandInpaintMaskd prefill: biharmonic"):
        module.on_train_batch_start(plain, 0)
    module.on_train_batch_start({**plain, CONDITION_KEY: inpaint_condition(image, mask, 1, "biharmonic")}, 0)
    assert module.condition_checked
    without = DiffusionModule.from_flat(image_shape=(16, 16), concat_channels=2, concat_key=CONDITION_KEY,
                                        task="inpaint", **TINY)
    prefilled_batch = {**plain, CONDITION_KEY: inpaint_condition(image, mask, 1, "biharmonic")}
    with pytest.raises(MeddiffError, match="RandInpaintMaskd prefill: null"):
        without.on_train_batch_start(prefilled_batch, 0)
    with pytest.raises(MeddiffError, match="2D inpainting"):
        DiffusionModule.from_flat(image_shape=(16, 16), conditioning={"prefill": "biharmonic"}, **TINY)  # generates
    with pytest.raises(MeddiffError, match="2D inpainting"):
        prefill_module(size=16, spatial_dims=3, image_shape=(16, 16, 16), image_spacing=(1.0,) * 3)
    with pytest.raises(MeddiffError, match="conditioning.prefill"):
        prefill_module(conditioning={"concat_key": CONDITION_KEY, "prefill": "telea"})


def test_the_prefill_travels_with_the_model_folder_and_old_folders_have_none(tmp_path):
    model = prefill_module().diffusion_model(ema=False)
    model.save_pretrained(tmp_path / "new")
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["inpaint_prefill"] == "biharmonic"
    assert DiffusionModel.from_pretrained(tmp_path / "new").config.inpaint_prefill == "biharmonic"
    old = tmp_path / "old"
    model.save_pretrained(old)
    (old / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "inpaint_prefill"}))
    assert DiffusionModel.from_pretrained(old).config.inpaint_prefill is None
    with pytest.raises(ValueError, match="inpaint_prefill"):
        ModelConfig.model_validate({**saved, "task": "generate", "unet": {**saved["unet"], "concat_channels": 0}})


@pytest.mark.parametrize("name", ["mri_inpaint_2d.yaml", "ct_inpaint_2d.yaml"])
def test_the_bundled_recipes_train_on_the_residual_of_the_biharmonic_fill(name):
    from pathlib import Path

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / name).read_text())
    module = DiffusionModule(**config["model"]["init_args"])
    assert module.model_config().inpaint_prefill == "biharmonic"


def test_a_ct_fill_never_goes_below_air():
    """A fill next to the scanner's -2048 HU padding (what biharmonic continues) is clipped to the physical range,
    as generated CT is; outside the mask the input, padding included, is kept."""
    module = prefill_module(size=16, modality="CT", intensity_range=(-1000.0, 1000.0))
    zero_output(module)
    truth = np.full((32, 32), 40.0, np.float32)
    truth[:, :12] = -2048.0  # outside the field of view
    fill = region(truth.shape, np.s_[8:24, 8:20])
    result = module.pipeline(ema=False).inpaint(Image(truth, np.eye(4), "CT"), fill, steps=1, progress=False)[0].array
    assert result[fill].min() == -1024.0 and result[fill].max() <= 3071.0
    assert np.array_equal(result[~fill], truth[~fill])
