"""The bundled models' recipes: their training arrays (``meddiff.data.arrays``) and the runner behind ``make models``
(``bench.models``): one recipe per bundled model, made by ``meddiff fit`` and ``meddiff export`` alone, installed
only when its benchmark is not worse than the shipped model's."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from meddiff.data import arrays
from meddiff.data.arrays import SliceArrayDataModule, coarser, prepared
from meddiff.data.masks import CONDITION_KEY, RandInpaintMaskd
from meddiff.errors import MeddiffError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import models as runner  # noqa: E402  (bench is a folder of the repository, not the package)


def tiny_slices() -> dict[str, np.ndarray]:
    """Four 32x32 slices, background -1, a bright 6x6 square (the foreground) at a different place in each."""
    images = np.full((4, 32, 32), -1.0, np.float16)
    foreground = np.zeros((4, 32, 32), bool)
    for i, (top, left) in enumerate([(2, 2), (20, 4), (4, 22), (24, 24)]):
        images[i, top:top + 6, left:left + 6] = 0.5
        foreground[i, top:top + 6, left:left + 6] = True
    return {"images": images, "foreground": foreground}


@pytest.fixture
def tiny_source(monkeypatch):
    calls = []

    def make():
        calls.append(1)
        return tiny_slices()

    monkeypatch.setitem(arrays.SOURCES, "tiny", make)
    return calls


def test_the_training_arrays_are_prepared_once_into_the_cache(tmp_path, tiny_source):
    path = prepared("tiny", tmp_path / "cache")
    assert path == tmp_path / "cache" / "tiny.npz" and prepared("tiny", tmp_path / "cache") == path
    assert len(tiny_source) == 1  # the second call used the file
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["images"], tiny_slices()["images"])
    with pytest.raises(MeddiffError, match="unknown training source 'nope'"):
        prepared("nope", tmp_path)


def test_items_are_seeded_by_index_cropped_around_the_foreground_and_conditioned(tmp_path, tiny_source):
    masks = RandInpaintMaskd(area=(0.05, 0.2), foreground_key="foreground")
    module = SliceArrayDataModule("tiny", cache=str(tmp_path), crop=16, conditions=[masks], batch_size=4,
                                  data_seed=3)
    module.setup("fit")
    dataset = module.dataset
    first, again = dataset[5], dataset[5]
    for key in ("image", CONDITION_KEY):
        torch.testing.assert_close(first[key], again[key])  # the same item whoever asks (any worker)
    assert not torch.equal(dataset[6]["image"], first["image"]) or not torch.equal(
        dataset[6][CONDITION_KEY], first[CONDITION_KEY])
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (4, 1, 16, 16) and batch[CONDITION_KEY].shape == (4, 2, 16, 16)
    for i in range(20):  # every crop is centred near the square: it holds part of it
        assert (dataset[i]["image"] > 0).any()
    whole = SliceArrayDataModule("tiny", cache=str(tmp_path), batch_size=2)
    whole.setup()
    assert whole.dataset[0]["image"].shape == (1, 32, 32) and set(whole.dataset[0]) == {"image"}
    with pytest.raises(MeddiffError, match="crop 64 is larger than the tiny slices"):
        SliceArrayDataModule("tiny", cache=str(tmp_path), crop=64).setup()


def test_coarser_takes_block_means_and_keeps_only_whole_valid_blocks():
    images = np.arange(16, dtype=np.float16).reshape(1, 4, 4)
    valid = np.ones((1, 4, 4), bool)
    valid[0, 0, 0] = False
    out = coarser({"images": images, "foreground": valid, "valid": valid, "labels": np.arange(16).reshape(1, 4, 4)},
                  2)
    np.testing.assert_array_equal(out["valid"][0], [[False, True], [True, True]])
    np.testing.assert_array_equal(out["images"][0], [[0.0, 4.5], [10.5, 12.5]])  # invalid block: the minimum
    np.testing.assert_array_equal(out["labels"][0], [[0, 2], [8, 10]])


def test_every_bundled_model_has_exactly_one_recipe_in_configs():
    shipped = {p.name for p in (ROOT / "meddiff" / "models").iterdir() if (p / "config.json").exists()}
    assert set(runner.RECIPES) == shipped
    configs = [stage.config for recipe in runner.RECIPES.values() for stage in recipe.stages]
    assert len(configs) == len(set(configs))
    for config in configs:
        assert (ROOT / config).exists(), config
    for recipe in runner.RECIPES.values():
        assert abs(sum(stage.share for stage in recipe.stages) - 1.0) < 1e-9


def test_the_overlay_says_where_how_long_and_on_what_but_sets_no_hyperparameter(tmp_path):
    stages = runner.RECIPES["ct-chest-2d"].stages
    args = argparse.Namespace(device="cpu", minutes=10, cache="c")
    latent = runner.overlay(stages[1], tmp_path / "latent", {"ct_autoencoder_2d": tmp_path / "ae" / "model"}, args,
                            tmp_path / "samples")
    assert latent["trainer"]["max_time"] == "00:00:02:30"  # a quarter of 10 minutes
    assert latent["trainer"]["precision"] == "32-true" and latent["trainer"]["accelerator"] == "cpu"
    assert latent["model"]["init_args"] == {"export_dir": str(tmp_path / "latent" / "model"),
                                            "autoencoder": str(tmp_path / "ae" / "model")}
    assert latent["data"]["init_args"]["latents"] == str(tmp_path / "ae" / "model")
    assert latent["data"]["init_args"]["manifest"] == str(tmp_path / "samples" / "manifest.jsonl")
    gpu = runner.overlay(runner.RECIPES["mri-inpaint"].stages[0], tmp_path, {},
                         argparse.Namespace(device="cuda", minutes=None, cache="c"), None)
    assert "max_time" not in gpu["trainer"] and "precision" not in gpu["trainer"]  # the config's own
    assert gpu["data"]["init_args"] == {"cache": "c"}


def test_install_copies_only_models_that_are_not_worse(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "shipped"
    for name in ("better", "worse"):
        (shipped / name).mkdir(parents=True)
        (shipped / name / "config.json").write_text("old")
        (tmp_path / "out" / name / "model").mkdir(parents=True)
        (tmp_path / "out" / name / "model" / "config.json").write_text("new")
    summary = {name: {"headline": "psnr", "new": {"psnr": 30.0}, "shipped": {"psnr": shipped_psnr},
                      "not_worse": 30.0 >= shipped_psnr} for name, shipped_psnr in (("better", 29.0), ("worse", 31.0))}
    summary["failed"] = {"error": "meddiff fit failed"}
    (tmp_path / "out" / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(runner, "MODELS_DIR", shipped)
    runner.install(argparse.Namespace(out=str(tmp_path / "out"), models=["worse"]))
    assert (shipped / "worse" / "config.json").read_text() == "old" and "better" not in capsys.readouterr().out
    runner.install(argparse.Namespace(out=str(tmp_path / "out"), models=["better", "worse", "failed"]))
    assert (shipped / "better" / "config.json").read_text() == "new"
    assert (shipped / "worse" / "config.json").read_text() == "old"
    assert sorted(p.name for p in shipped.iterdir()) == ["better", "worse"]  # nothing staged is left behind
    printed = capsys.readouterr().out
    assert "better: installed — psnr 30.0 against the shipped 29.0" in printed
    assert "worse: kept the shipped model — psnr 30.0 against the shipped 31.0" in printed
    assert "failed: not installed" in printed


def test_a_recipe_trains_exports_in_float16_and_gets_its_card(tmp_path):
    """The mri-inpaint recipe, made tiny (2 steps, a small UNet and crop, four 32x32 slices in the cache),
    through the runner's own meddiff fit and meddiff export."""
    config = yaml.safe_load((ROOT / "configs" / "mri_inpaint_2d.yaml").read_text())
    config["trainer"]["max_steps"] = 2
    config["model"]["init_args"]["unet"].update(channels=[8, 8], attention_levels=[False, False], norm_num_groups=4,
                                                num_head_channels=8)
    config["model"]["init_args"]["image"]["shape"] = [16, 16]
    config["data"]["init_args"].update(crop=16, batch_size=2, downsample=1)
    recipe_file = tmp_path / "mri_inpaint_tiny.yaml"
    recipe_file.write_text("# A tiny recipe for the test.\n" + yaml.safe_dump(config))
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "mri.npz", **tiny_slices())
    recipe = runner.Recipe((runner.Stage(str(recipe_file)),), lambda model, folder: {}, "psnr_mean", True, "none")
    args = argparse.Namespace(device="cpu", minutes=None, cache=str(cache), threads=1)
    model, records = runner.train("mri-inpaint", recipe, tmp_path / "out", args)
    assert records[0]["steps"] == 2 and records[0]["device"] == "cpu" and records[0]["stopped_by"] == "steps"
    from safetensors import safe_open

    with safe_open(str(model / "unet.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}
    saved = json.loads((model / "config.json").read_text())
    assert saved["inpaint_steps"] == 1 and saved["task"] == "inpaint"
    text = runner.card("mri-inpaint", recipe, records, {"psnr_mean": 20.0}, {"psnr_mean": 19.0}, "cpu")
    assert "A tiny recipe for the test." in text and "2 steps in" in text and "| psnr_mean | 20.0 | 19.0 |" in text
