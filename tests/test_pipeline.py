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
from meddiff.diffusion.schedulers import SCHEDULERS, NoiseSchedule
from meddiff.pipelines import DiffusionPipeline, load_pipeline
from meddiff.training import DiffusionModule

MEDDIFF = str(Path(sys.executable).parent / "meddiff")
TINY = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)


def tiny_pipeline(spatial_dims=2, **kwargs) -> DiffusionPipeline:
    torch.manual_seed(0)
    shape = (16,) * spatial_dims
    module = DiffusionModule.from_flat(
        spatial_dims=spatial_dims, image_shape=shape, image_spacing=(2.0,) * spatial_dims, **{**TINY, **kwargs}
    )
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return module.pipeline(ema=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_pipeline(modality="CT", intensity_range=(-1000.0, 1000.0)).save_pretrained(
        tmp_path_factory.mktemp("m") / "model"
    )


MODEL_KINDS = [(2, "v", "cosine"), (3, "eps", "linear"), (2, "x0", "scaled_linear")]


@pytest.mark.parametrize(
    ("spatial_dims", "prediction", "schedule", "scheduler"),
    # pndm takes no x0 model: see the x0 test
    [(*kind, s) for kind in MODEL_KINDS for s in SCHEDULERS if not (kind[1] == "x0" and s == "pndm")],
)
def test_every_scheduler_gives_finite_output(spatial_dims, prediction, schedule, scheduler):
    pipeline = tiny_pipeline(spatial_dims, prediction=prediction, beta_schedule=schedule)
    x = pipeline.sample([0, 1], steps=3, scheduler=scheduler)
    assert x.shape == (2, 1, *(16,) * spatial_dims) and torch.isfinite(x).all()


def test_seed_decides_each_image_whatever_the_batch(model_dir):
    pipeline = DiffusionPipeline.from_pretrained(model_dir)
    together = pipeline.generate(3, steps=3, seed=5, batch_size=3, progress=False)
    alone = pipeline.generate(1, steps=3, seed=7, progress=False)[0]
    np.testing.assert_allclose(together[2].array, alone.array, rtol=1e-5, atol=1e-3)
    assert not np.allclose(together[0].array, together[1].array)


def test_images_carry_modality_and_training_spacing(model_dir):
    image = load_pipeline(str(model_dir)).generate(1, steps=2, progress=False)[0]
    assert image.modality == "CT" and image.spacing == (2.0, 2.0) and image.orientation == "RA"


def test_class_conditioning_changes_samples():
    pipeline = tiny_pipeline(num_class_embeds=3)
    a = pipeline.sample([0], steps=2, class_label=0)
    b = pipeline.sample([0], steps=2, class_label=2)
    assert not torch.allclose(a, b)


def test_bad_model_folders_and_names(tmp_path):
    with pytest.raises(MeddiffError, match="no model"):
        load_pipeline(tmp_path / "nothing")
    with pytest.raises(MeddiffError, match="not a meddiff model folder"):
        load_pipeline(tmp_path)
    with pytest.raises(MeddiffError, match="unknown scheduler"):
        NoiseSchedule().scheduler("magic")
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
    assert main(
        ["generate", "--model", str(model_dir), "-n", "2", "-o", str(out), "--steps", "2", "--format", "dcm"]
    ) == 0
    files = sorted(out.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    assert all("DERIVED" in ds.ImageType and "SYNTHETIC" in ds.ImageType for ds in datasets)
    assert datasets[0].SOPInstanceUID != datasets[1].SOPInstanceUID
    assert datasets[0].SeriesInstanceUID != datasets[1].SeriesInstanceUID
    assert datasets[0].PatientID == "SYNTHETIC" and datasets[0].PatientIdentityRemoved == "YES"
    assert datasets[0].DeidentificationMethod and datasets[0].PatientBirthDate == ""
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


def test_generate_refuses_foreign_folders_and_other_runs(model_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.jsonl").write_text('{"image": "a.nii.gz", "modality": "MR"}\n')
    before = (foreign / "manifest.jsonl").read_text()
    base = ["generate", "--model", str(model_dir), "-n", "2", "--steps", "2"]
    assert main([*base, "-o", str(foreign)]) == 2
    assert (foreign / "manifest.jsonl").read_text() == before  # the user's manifest is untouched

    out = tmp_path / "gen"
    assert main([*base, "-o", str(out), "--seed", "1"]) == 0
    for other in (["--seed", "2"], ["--scheduler", "dpm++2m", "--seed", "1"], ["--format", "png", "--seed", "1"]):
        assert main([*base, "-o", str(out), *other]) == 2
    assert len(Manifest.read(out / "manifest.jsonl").records) == 2


def test_generate_3d_dicom_series_resumes_after_a_lost_record(tmp_path):
    pipeline = tiny_pipeline(3, modality="MR")
    model = pipeline.save_pretrained(tmp_path / "model3d")
    out = tmp_path / "dcm3d"
    args = ["generate", "--model", str(model), "-n", "2", "-o", str(out), "--steps", "2", "--format", "dcm"]
    assert main(args) == 0
    series = load_image(out / "sample_000001")
    assert series.array.shape == (16, 16, 16) and series.spacing == pytest.approx((2.0, 2.0, 2.0))
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text(lines[0] + "\n")  # as if the run died after writing item 1
    assert main(args) == 0
    assert len(Manifest.read(out / "manifest.jsonl").records) == 2
    assert not list(out.glob(".*partial"))


def test_x0_models_refuse_samplers_that_cannot_use_them():
    pipeline = tiny_pipeline(prediction="x0")
    with pytest.raises(MeddiffError, match="x0-prediction"):
        pipeline.sample([0], steps=2, scheduler="pndm")
    assert torch.isfinite(pipeline.sample([0], steps=2, scheduler="dpm++2m")).all()


def test_ct_output_maps_back_to_hounsfield_units(model_dir):
    pipeline = DiffusionPipeline.from_pretrained(model_dir)
    x = pipeline.sample([0], steps=2)
    image = pipeline.to_image(x[0])
    hu = np.clip(x[0, 0].numpy() * 1000.0, -1024.0, 3071.0)  # [-1, 1] -> -1000..1000 HU, in the physical range
    np.testing.assert_allclose(image.array, hu, rtol=1e-5, atol=1e-3)


def test_a_shard_line_cut_by_an_interruption_does_not_swallow_the_next_record(model_dir, tmp_path):
    out = tmp_path / "gen"
    args = ["generate", "--model", str(model_dir), "-n", "2", "-o", str(out), "--steps", "2"]
    assert main(args) == 0
    first, _ = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text(first + "\n")
    (out / "manifest.rank0.jsonl").write_text('{"image": "sample_0000')  # killed mid-line, no newline
    # records come before files: a record cut short means its file was never written
    (out / "sample_000001.nii.gz").unlink()
    assert main(args) == 0
    assert [r.provenance["index"] for r in Manifest.read(out / "manifest.jsonl").records] == [0, 1]


def test_concat_conditioned_models_sample_through_the_pipeline():
    """A model trained with a concatenated condition (concat_key) samples given that condition, and only then."""
    pipeline = tiny_pipeline(concat_channels=1, concat_key="mask")
    condition = torch.zeros(2, 1, 16, 16)
    condition[:, :, 4:12, 4:12] = 1.0
    x = pipeline.sample([0, 1], steps=3, condition=condition)
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    # the condition reaches the network
    assert not torch.equal(x, pipeline.sample([0, 1], steps=3, condition=-condition))
    # per item, batch-independent
    torch.testing.assert_close(x[1:], pipeline.sample([1], steps=3, condition=condition[1:]))
    with pytest.raises(MeddiffError, match="condition image"):
        pipeline.sample([0], steps=3)
    with pytest.raises(MeddiffError, match="condition has shape"):
        pipeline.sample([0], steps=3, condition=condition)
    with pytest.raises(MeddiffError, match="takes no condition"):
        tiny_pipeline().sample([0], steps=3, condition=condition[:1])
