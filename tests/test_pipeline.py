"""Pipelines: every sampler, seeds, save/load, class conditioning, and ``meddiff generate``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff import MeddiffError, load_image
from meddiff.cli.main import main
from meddiff.data.manifest import Manifest
from meddiff.diffusion.schedulers import SAMPLERS, NoiseSchedule
from meddiff.pipeline import DiffusionPipeline, load_pipeline
from meddiff.training import DiffusionModule

MEDDIFF = str(Path(sys.executable).parent / "meddiff")
TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)


def tiny_pipeline(spatial_dims=2, **kwargs) -> DiffusionPipeline:
    torch.manual_seed(0)
    shape = (16,) * spatial_dims
    module = DiffusionModule(spatial_dims=spatial_dims, image_shape=shape, image_spacing=(2.0,) * spatial_dims, **{**TINY, **kwargs})
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return module.pipeline(ema=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_pipeline(modality="CT", intensity_range=(-1000.0, 1000.0)).save_pretrained(tmp_path_factory.mktemp("m") / "model")


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("scheduler", list(SAMPLERS))
def test_every_scheduler_gives_finite_output(spatial_dims, scheduler):
    pipeline = tiny_pipeline(spatial_dims, prediction="v", beta_schedule="cosine")
    x = pipeline.sample([0, 1], steps=3, scheduler=scheduler)
    assert x.shape == (2, 1, *(16,) * spatial_dims) and torch.isfinite(x).all()


def test_seed_decides_each_image_whatever_the_batch(model_dir):
    pipeline = DiffusionPipeline.from_pretrained(model_dir)
    together = pipeline.generate(3, steps=3, seed=5, batch_size=3, progress=False)
    alone = pipeline.generate(1, steps=3, seed=7, progress=False)[0]
    np.testing.assert_allclose(together[2].array, alone.array, rtol=1e-5, atol=1e-3)
    assert not np.allclose(together[0].array, together[1].array)


def test_images_come_back_in_physical_units(model_dir):
    image = load_pipeline(str(model_dir)).generate(1, steps=2, progress=False)[0]
    assert image.modality == "CT" and image.spacing == (2.0, 2.0)
    assert np.abs(image.array).max() > 50  # [-1, 1] mapped back to the +-1000 HU window


def test_class_conditioning_changes_samples():
    pipeline = tiny_pipeline(num_class_embeds=3)
    a = pipeline.sample([0], steps=2, class_labels=torch.tensor([0]))
    b = pipeline.sample([0], steps=2, class_labels=torch.tensor([2]))
    assert not torch.allclose(a, b)


def test_bad_model_folders_and_names(tmp_path):
    with pytest.raises(MeddiffError, match="no model"):
        load_pipeline(tmp_path / "nothing")
    with pytest.raises(MeddiffError, match="not a meddiff model folder"):
        load_pipeline(tmp_path)
    with pytest.raises(MeddiffError, match="unknown scheduler"):
        NoiseSchedule().sampler("magic")
    with pytest.raises(MeddiffError, match="prediction"):
        NoiseSchedule(prediction="noise")


def test_generate_writes_images_and_provenance_and_resumes(model_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(model_dir), "-o", str(out), "--steps", "2", "--batch-size", "2", "--seed", "3"]
    assert main([*args, "-n", "3"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("sample_*")}
    assert main([*args, "-n", "5"]) == 0
    assert "2 new images" in capsys.readouterr().out.splitlines()[-1]
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in first.items())  # finished items untouched
    manifest = Manifest.read(out / "manifest.jsonl")
    assert [r.provenance["seed"] for r in manifest.records] == [3, 4, 5, 6, 7]
    record = manifest.records[0]
    assert record.synthetic and record.modality == "CT" and record.provenance["scheduler"] == "ddim"
    assert len(record.provenance["weights_sha256"]) == 64
    manifest.check_images()


def test_generate_dicom_is_marked_synthetic(model_dir, tmp_path):
    import pydicom

    out = tmp_path / "dcm"
    assert main(["generate", "--model", str(model_dir), "-n", "2", "-o", str(out), "--steps", "2", "--format", "dcm"]) == 0
    files = sorted(out.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    assert all("DERIVED" in ds.ImageType and "SYNTHETIC" in ds.ImageType for ds in datasets)
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    assert datasets[0].SeriesInstanceUID != datasets[1].SeriesInstanceUID
    assert str(datasets[0].PatientName) == "SYNTHETIC" and datasets[0].PatientIdentityRemoved == "YES"
    image = load_image(files[0])
    assert image.modality == "CT" and image.spacing == pytest.approx((2.0, 2.0))


def test_generate_with_two_processes_writes_one_manifest(model_dir, tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [MEDDIFF, "generate", "--model", str(model_dir), "-n", "5", "-o", str(out), "--steps", "2", "--batch-size", "1",
         "--devices", "2", "--accelerator", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"] + [f"sample_{i:06d}.nii.gz" for i in range(5)]
    assert [r.provenance["index"] for r in Manifest.read(out / "manifest.jsonl").records] == [0, 1, 2, 3, 4]
    single = DiffusionPipeline.from_pretrained(model_dir).generate(1, steps=2, seed=4, progress=False)[0]
    np.testing.assert_allclose(load_image(out / "sample_000004.nii.gz").array, single.array, atol=1e-2)


def test_generate_rejects_bad_arguments(model_dir, tmp_path):
    base = ["generate", "--model", str(model_dir), "-o", str(tmp_path / "x")]
    assert main([*base, "-n", "0"]) == 2
    assert main([*base, "-n", "1", "--scheduler", "magic"]) == 2
    assert main(["generate", "--model", str(tmp_path / "none"), "-n", "1", "-o", str(tmp_path / "y")]) == 2
