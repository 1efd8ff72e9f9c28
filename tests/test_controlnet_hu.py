"""The label-map CT ControlNet's HU rendering, padding as air in training data, and generated CT in the physical
range (tiny models: fast on a CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from monai.data import MetaTensor
from test_training import CONFIGS

from meddiff import Image
from meddiff.data.masks import PaddingToAird
from meddiff.data.structure_hu import body_from_labels, render_hu, structure_hu
from meddiff.errors import MeddiffError
from meddiff.model import BUNDLED_MODELS, ControlNetConfig, DiffusionModel, ModelConfig, load_model
from meddiff.pipelines import DiffusionPipeline
from meddiff.pipelines.generate import physical

TABLE = {0: -50.0, 5: 70.0, 10: -880.0}
WINDOW = (-1000.0, 1000.0)


def test_body_from_labels_is_labelled_or_between_labelled_voxels_along_a_row_or_column():
    labels = torch.zeros(1, 1, 5, 7, dtype=torch.long)
    labels[0, 0, 2, 1] = labels[0, 0, 2, 5] = 3  # a row with a gap
    labels[0, 0, 0, 3] = labels[0, 0, 4, 3] = 4  # a column with a gap
    body = body_from_labels(labels)[0, 0]
    assert body[2, 1:6].all() and not body[2, 0] and not body[2, 6]  # between along the row, not beyond
    assert body[:, 3].all() and not body[1, 2] and not body[3, 4]  # between along the column, nothing else
    assert int(body.sum()) == 9
    assert not body_from_labels(torch.zeros(2, 1, 4, 4)).any()


def test_the_hu_rendering_gives_each_label_its_table_value_in_model_units():
    labels = torch.tensor([[0, 0, 0, 0, 0, 0],
                           [0, 5, 0, 10, 77, 0],
                           [0, 0, 0, 0, 0, 0]]).view(1, 1, 3, 6)
    rendered = render_hu(labels, TABLE, WINDOW)[0, 0]
    expected = torch.full((3, 6), -1.0)  # not between labelled voxels: air, -1000 HU
    expected[1, 1:5] = torch.tensor([0.07, -0.05, -0.88, -0.05])  # liver, label 0 between labels, lung, unknown
    torch.testing.assert_close(rendered, expected)
    other = render_hu(labels.float(), TABLE, (-3000.0, 1000.0))[0, 0]  # another window: other model units
    torch.testing.assert_close(other[1, 1], torch.tensor(2 * 3070 / 4000 - 1))


def test_the_table_is_each_labels_median_inside_the_field_of_view_and_label_0_inside_the_body():
    hu = np.full((4, 6, 1), -1000.0, np.float32)
    labels = np.zeros((4, 6, 1), np.int64)
    labels[1, 1:3, 0] = labels[1, 4, 0] = 5
    hu[1, 1:3, 0] = [60.0, 80.0]
    hu[1, 4, 0] = -2048.0  # padding: outside the field of view, not liver
    hu[1, 3, 0] = -100.0  # unlabelled, between liver voxels: body
    hu[3, :, 0] = -2048.0
    table = structure_hu([(hu, labels), (np.array([[[40.0]]]), np.array([[[5]]]))])
    assert table == {0: -100.0, 5: 60.0}


def test_an_old_controlnet_config_without_a_table_keeps_its_channels():
    old = json.loads((BUNDLED_MODELS / "ct-chest-2d" / "config.json").read_text())["controlnet"]
    old.pop("structure_hu")  # as models made before the table were written
    old["conditioning_channels"] = 7
    config = ControlNetConfig.model_validate(old)
    assert config.structure_hu == {} and config.label_channels == config.conditioning_channels == 7
    labels = torch.tensor([0, 1, 5, 118]).view(1, 1, 2, 2)
    control = config.condition(labels, WINDOW)
    assert control.shape == (1, 7, 2, 2) and set(control.unique().tolist()) == {0.0, 1.0}  # binary digits only
    model = load_model("ct-chest-2d")  # the bundled model: binary digits and the HU rendering
    assert model.config.controlnet.structure_hu[0] == pytest.approx(-54.0)
    assert model.controlnet.controlnet_cond_embedding.conv_in.conv.in_channels == 8
    with_table = ControlNetConfig(conditioning_channels=8, structure_hu=TABLE)
    assert with_table.label_channels == 7 and with_table.condition(labels, WINDOW).shape == (1, 8, 2, 2)
    with pytest.raises(ValueError, match="label 0"):
        ControlNetConfig(conditioning_channels=8, structure_hu={5: 70.0})


def tiny_base(tmp_path, modality: str = "CT", intensity_range=WINDOW) -> DiffusionModel:
    torch.manual_seed(0)
    config = ModelConfig(
        unet={"channels": [16, 16], "attention_levels": [False, False], "num_head_channels": 16,
              "norm_num_groups": 16},
        schedule={"prediction": "v", "kind": "rflow"},
        image={"shape": [16, 16], "spacing": [2.0, 2.0], "modality": modality, "intensity_range": intensity_range})
    model = DiffusionModel(config).to("cpu")
    model.save_pretrained(tmp_path / "base")
    return model


def test_training_and_generation_build_the_same_condition_from_the_same_map(tmp_path):
    from meddiff.training import ControlNetModule

    tiny_base(tmp_path)
    (tmp_path / "names.json").write_text(json.dumps({"5": "liver", "10": "lung"}))
    (tmp_path / "hu.json").write_text(json.dumps({str(k): v for k, v in TABLE.items()}))
    module = ControlNetModule(base=str(tmp_path / "base"), structures=str(tmp_path / "names.json"),
                              structure_hu=str(tmp_path / "hu.json"), conditioning_embedding_channels=[8])
    assert module.control_config.conditioning_channels == 5  # 4 binary digits for label 10, and the HU rendering
    labels = torch.zeros(2, 1, 16, 16)
    labels[:, :, 4:12, 3:8], labels[:, :, 4:12, 9:13], labels[1, :, 0, 0] = 5.0, 10.0, 3.0
    seen = []

    def spy(x, t, control, scale):
        seen.append(control)
        return module.controlnet(x, t, control, scale)

    module.loss({"image": torch.zeros(2, 1, 16, 16), "mask": labels}, torch.Generator().manual_seed(0), spy)
    module.diffusion_model().save_pretrained(tmp_path / "model")
    model = load_model(tmp_path / "model")
    assert model.config.controlnet.structure_hu == TABLE and model.config.controlnet.conditioning_channels == 5
    generated = model.conditioned_unet(2, labels.long()).control
    torch.testing.assert_close(generated, seen[0])
    assert float(generated[0, 4, 8, 8]) == pytest.approx(-0.05)  # label 0 between liver and lung
    assert float(generated[1, 4, 0, 0]) == pytest.approx(-0.05)  # label 3: not in the table, as label 0
    assert float(generated[0, 4, 0, 0]) == -1.0  # outside: air
    made = DiffusionPipeline(model).generate(1, steps=2, labels=Image(labels[0, 0].numpy(), np.eye(4)),
                                             progress=False)[0]
    assert made.array.shape == (16, 16) and np.isfinite(made.array).all()
    with pytest.raises(MeddiffError, match="labels 16 to 16; this model knows 0 to 15"):
        DiffusionPipeline(model).generate(1, labels=Image(np.full((16, 16), 16.0, np.float32), np.eye(4)),
                                          progress=False)


def test_a_broken_hu_table_is_one_clear_line(tmp_path):
    from meddiff.training import ControlNetModule

    tiny_base(tmp_path)
    (tmp_path / "hu.json").write_text(json.dumps({"5": 70.0}))
    with pytest.raises(MeddiffError, match="needs label 0"):
        ControlNetModule(base=str(tmp_path / "base"), structure_hu=str(tmp_path / "hu.json"))
    (tmp_path / "hu.json").write_text("[1, 2]")
    with pytest.raises(MeddiffError, match="cannot read the structure HU table"):
        ControlNetModule(base=str(tmp_path / "base"), structure_hu=str(tmp_path / "hu.json"))


def test_padding_becomes_air_and_the_field_of_view_stays_bit_for_bit():
    image = torch.linspace(-1.2, 3.0, 64).view(1, 8, 8) + 1e-4
    image[0, :2] = -2.048  # -2048 HU with the default window
    image[0, 2, :3] = torch.tensor([-1.5, -1.4999, -1.0001])  # the threshold is padding; above it, kept
    item = {"image": MetaTensor(image.clone(), affine=torch.diag(torch.tensor([0.7, 0.7, 2.5, 1.0]))),
            "mask": torch.ones(1, 8, 8)}
    out = PaddingToAird()(item)
    padding = image <= -1.5
    assert padding[0, :2].all() and padding.sum() == 17
    assert torch.equal(out["image"][padding], torch.full((int(padding.sum()),), -1.0))
    assert torch.equal(out["image"][~padding], image[~padding])  # bit for bit
    assert isinstance(out["image"], MetaTensor) and torch.equal(out["image"].affine, item["image"].affine)
    assert out["mask"] is item["mask"]


@pytest.mark.parametrize("name", ["ct_autoencoder_2d.yaml", "ct_latent_2d.yaml", "ct_controlnet_2d.yaml",
                                  "smoke/ct_autoencoder_2d.yaml", "smoke/ct_latent_2d.yaml",
                                  "smoke/ct_controlnet_2d.yaml"])
def test_the_ct_generator_recipes_train_on_padding_as_air(name):
    data = yaml.safe_load((CONFIGS / name).read_text())["data"]["init_args"]
    assert [t["class_path"] for t in data["preprocess"]] == ["meddiff.data.masks.PaddingToAird"]


def test_generated_ct_stays_in_the_physical_range(tmp_path):
    """A wide intensity range makes the untrained network's output reach far beyond -1024..3071 HU; CT is clipped
    there, other modalities are not."""
    model = tiny_base(tmp_path, intensity_range=(-50000.0, 50000.0))
    images = DiffusionPipeline(model).generate(2, steps=2, progress=False)
    values = np.concatenate([image.array.ravel() for image in images])
    assert values.min() == -1024.0 and values.max() == 3071.0
    mr = tiny_base(tmp_path / "mr", modality="MR", intensity_range=(-50000.0, 50000.0))
    values = DiffusionPipeline(mr).generate(1, steps=2, progress=False)[0].array
    assert values.min() < -1024.0 or values.max() > 3071.0
    np.testing.assert_allclose(physical(model, np.array([-3.0, 0.0, 0.05, 5.0])), [-1024.0, 0.0, 2500.0, 3071.0])
