"""Mask-conditioned inpainting: random training masks, the condition, and ``meddiff inpaint`` choosing the
model's own method (no RePaint) for a model trained with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff import Image, MeddiffError
from meddiff.data.masks import CONDITION_KEY, RandInpaintMaskd, foreground, inpaint_condition
from meddiff.training import DiffusionModule

TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)
INPAINT = dict(concat_channels=2, concat_key=CONDITION_KEY, task="inpaint")


def brain_slice() -> np.ndarray:
    from meddiff.data.samples import dipy_t1_slice

    array = dipy_t1_slice().array
    return (array / array.max() * 2 - 1)[None].astype(np.float32)  # model units, channel first


@pytest.mark.parametrize("shape", ["blob", "box", "stroke"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masks_cover_the_asked_share_of_the_foreground(shape, spatial_dims):
    image = brain_slice() if spatial_dims == 2 else np.random.default_rng(0).random((1, 40, 40, 24), dtype=np.float32)
    transform = RandInpaintMaskd(shapes=[shape], area=(0.02, 0.2))
    transform.set_random_state(1)
    tissue = foreground(image[0]).sum()
    shares = []
    for _ in range(8):
        item = transform({"image": torch.from_numpy(image)})
        mask = item["inpaint_mask"]
        assert mask.shape == (1, *image.shape[1:]) and set(mask.unique().tolist()) <= {0.0, 1.0}
        condition = item[CONDITION_KEY]
        assert condition.shape == (2, *image.shape[1:])
        torch.testing.assert_close(condition[1], mask[0])
        torch.testing.assert_close(condition[0], torch.from_numpy(image[0]) * (1 - mask[0]))
        shares.append(float(mask.sum()) / tissue)
    assert 0.005 <= min(shares) and max(shares) <= 0.4 and len(set(shares)) > 1  # drawn anew, about the asked size


def test_masks_are_reproducible_from_the_random_state():
    image = torch.from_numpy(brain_slice())
    first, second = RandInpaintMaskd(), RandInpaintMaskd()
    first.set_random_state(5), second.set_random_state(5)
    assert torch.equal(first({"image": image})["inpaint_mask"], second({"image": image})["inpaint_mask"])


def test_bad_mask_settings_are_refused():
    with pytest.raises(MeddiffError, match="shapes"):
        RandInpaintMaskd(shapes=["circle"])
    with pytest.raises(MeddiffError, match="area"):
        RandInpaintMaskd(area=(0.5, 0.1))
    with pytest.raises(MeddiffError, match="concat_channels 2"):
        DiffusionModule.from_flat(image_shape=(16, 16), concat_channels=1, concat_key="x", task="inpaint", **TINY)


def test_the_loss_of_an_inpainting_model_uses_the_condition():
    module = DiffusionModule.from_flat(image_shape=(32, 32), **INPAINT, **TINY)
    for p in module.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    image = torch.rand(2, 1, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:20, 8:20] = 1
    batch = {"image": image, CONDITION_KEY: inpaint_condition(image, mask, channel_dim=1)}
    other = {"image": image, CONDITION_KEY: inpaint_condition(image, 1 - mask, channel_dim=1)}
    loss = module.loss(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss != module.loss(other, torch.Generator().manual_seed(0))


class ConditionOracle(torch.nn.Module):
    """An x0 predictor that sees [x_t, masked image, mask] and returns ``target``; records what it saw."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.target, self.seen = target, []
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels=None, context=None):
        self.seen.append(x[:, 1:].clone())
        return self.target.expand(x.shape[0], 1, *x.shape[2:])


def test_a_mask_conditioned_model_fills_in_one_plain_pass_with_its_condition():
    module = DiffusionModule.from_flat(
        image_shape=(64, 64), image_spacing=(1.0, 1.0), prediction="x0", **INPAINT, **TINY)
    pipeline = module.pipeline(ema=False)
    assert pipeline.config.task == "inpaint"
    rng = np.random.default_rng(0)
    truth = rng.random((64, 64), dtype=np.float32) * 100
    image = Image(truth, np.eye(4), "MR")
    fill = np.zeros((64, 64), bool)
    fill[20:40, 10:30] = True
    from meddiff.pipelines.volumes import intensity_window

    low, high = intensity_window(pipeline.config, truth)
    oracle = ConditionOracle(torch.from_numpy((truth - low) / (high - low) * 2 - 1)[None, None])
    pipeline.unet = oracle
    result = pipeline.inpaint(image, fill, steps=5, scheduler="dpm++2m", progress=False)[0]
    assert len(oracle.seen) == 5  # one network call per step: no RePaint resampling
    masked, mask = oracle.seen[0][0, 0], oracle.seen[0][0, 1]
    assert torch.equal(mask.bool(), torch.from_numpy(fill)) and torch.all(masked[mask.bool()] == 0)
    np.testing.assert_allclose(result.array[fill], truth[fill], atol=1e-3)
    assert np.array_equal(result.array[~fill], truth[~fill])
    oracle.seen.clear()  # one step starts at the last timestep (trailing spacing) and returns the x0 estimate
    pipeline.config.inpaint_steps = 1
    result = pipeline.inpaint(image, fill, scheduler="ddim", progress=False)[0]
    assert len(oracle.seen) == 1
    np.testing.assert_allclose(result.array[fill], truth[fill], atol=1e-3)


def test_structure_masks_cut_out_one_whole_labelled_region_and_fall_back_to_blobs():
    image = np.zeros((1, 64, 64), np.float32)
    labels = np.zeros((1, 64, 64), np.float32)
    labels[0, 10:20, 10:30] = 5  # 200 voxels: 5 % of the 4096-voxel foreground
    labels[0, 40:42, 40:42] = 7  # 4 voxels: below 1 %, never chosen
    body = np.ones((1, 64, 64), np.float32)
    transform = RandInpaintMaskd(shapes=["structure"], area=(0.01, 0.3), foreground_key="body", labels_key="labels")
    transform.set_random_state(0)
    item = transform({"image": torch.from_numpy(image), "labels": torch.from_numpy(labels),
                      "body": torch.from_numpy(body)})
    assert torch.equal(item["inpaint_mask"][0].bool(), torch.from_numpy(labels[0] == 5))
    labels[0, 10:20, 10:30] = 0  # nothing fits any more: a blob instead
    item = transform({"image": torch.from_numpy(image), "labels": torch.from_numpy(labels),
                      "body": torch.from_numpy(body)})
    share = float(item["inpaint_mask"].sum()) / body.size
    assert 0.005 <= share <= 0.4 and not bool(item["inpaint_mask"][0, 40:42, 40:42].all())
    with pytest.raises(MeddiffError, match="labels_key"):
        RandInpaintMaskd(shapes=["structure"])


def test_field_of_view_padding_is_invalid_and_the_body_includes_the_lungs():
    from meddiff.data.masks import FieldOfViewd

    hu = np.full((64, 64), -2048.0, np.float32)  # padding outside the scanner's circle
    yy, xx = np.mgrid[:64, :64]
    hu[(yy - 32) ** 2 + (xx - 32) ** 2 < 30**2] = -1000  # air inside the field of view
    body = (yy - 32) ** 2 / 20**2 + (xx - 32) ** 2 / 25**2 < 1
    hu[body] = 40  # soft tissue
    lung = (yy - 32) ** 2 + (xx - 22) ** 2 < 6**2
    hu[lung] = -850
    image = torch.from_numpy(hu / 1000)[None]  # model units of the window -1000..1000 HU
    item = FieldOfViewd()({"image": image})
    assert torch.equal(item["valid"][0].bool(), torch.from_numpy(hu > -1500))
    assert torch.equal(item["body"][0].bool(), torch.from_numpy(body))  # lungs filled in, air outside not


def test_the_loss_weighs_the_region_to_fill_and_never_counts_invalid_voxels():
    module = DiffusionModule.from_flat(
        image_shape=(16, 16), outside_mask_weight=0.1, valid_key="valid", **INPAINT, **TINY)
    image = torch.zeros(1, 1, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8, :] = 1
    valid = torch.ones(1, 1, 16, 16)
    valid[..., :, :4] = 0
    batch = {"image": image, CONDITION_KEY: inpaint_condition(image, mask, channel_dim=1), "valid": valid}
    expected = torch.where(mask.bool(), 1.0, 0.1) * valid
    torch.testing.assert_close(module.loss_weight(batch), expected)
    with pytest.raises(MeddiffError, match="outside_mask_weight"):
        DiffusionModule.from_flat(image_shape=(16, 16), outside_mask_weight=0.1, **TINY)
