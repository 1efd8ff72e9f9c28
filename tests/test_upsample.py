"""Through-plane super-resolution: thick slices as a scanner makes them, the output grid, the three methods and
``auto``, the model task's training target, and ``meddiff upsample`` from NIfTI and from a real DICOM series."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest
import torch

from meddiff import Image, MeddiffError
from meddiff.cli.main import main
from meddiff.data.thick import CONDITION_KEY, RandThickSlicesd, slab_average, thick_and_back, through_plane
from meddiff.io import load_image, save_image
from meddiff.pipelines.upsample import UpsampleSpec, output_grid, upsample
from meddiff.training import DiffusionModule, smore

TINY = dict(channels=(16, 32), attention_levels=(False, False), num_head_channels=16, norm_num_groups=16)


def phantom(shape=(40, 40, 48), spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Smooth blobs: detail along every axis, so thick slices lose some."""
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    rng = np.random.default_rng(0)
    out = np.zeros(shape, np.float32)
    for _ in range(12):
        centre = [rng.uniform(0, n * s) for n, s in zip(shape, spacing, strict=True)]
        out += rng.uniform(50, 200) * np.exp(-sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) / 30)
    return out


def thick_volume(factor: int = 4, integers: bool = False) -> tuple[Image, np.ndarray]:
    """The phantom at 1 mm made ``factor`` mm thick along its last axis (slab averages), and the truth."""
    truth = phantom()
    centres = np.arange(0, truth.shape[2], factor)
    thick = slab_average(truth, 2, centres, factor)
    thick = np.round(thick) if integers else thick
    affine = np.array([[1.0, 0, 0, -20], [0, 1.0, 0, 5], [0, 0, float(factor), -30], [0, 0, 0, 1]])
    return Image(thick, affine, "MR"), truth[:, :, : centres[-1] + 1]


def test_slab_average_is_the_mean_over_the_slice_profile():
    line = np.arange(12, dtype=float)[None]
    assert slab_average(line, 1, [5.0], 3.0)[0, 0] == pytest.approx(5.0)  # voxels 4, 5, 6
    assert slab_average(line, 1, [5.5], 2.0)[0, 0] == pytest.approx(5.5)  # half of 4 and 7, all of 5 and 6
    assert slab_average(line, 1, [0.0], 3.0)[0, 0] == pytest.approx(0.5)  # clipped at the edge: voxels 0 and 1
    np.testing.assert_allclose(slab_average(line, 1, [2.0, 7.0], 1.0)[0], [2.0, 7.0])  # one voxel: the voxel


def test_through_plane_passes_through_the_slices_and_holds_the_edges():
    rng = np.random.default_rng(1)
    samples = rng.random((3, 6)).astype(np.float32)
    out = through_plane(samples, 1, np.arange(6) * 4.0 + 2, 26)
    assert out.shape == (3, 26)
    assert np.array_equal(out[:, 2::4][:, :6], samples)  # bit for bit at the slices
    assert np.array_equal(out[:, 0], samples[:, 0]) and np.array_equal(out[:, 25], samples[:, 5])  # no extrapolation
    smooth = np.sin(np.linspace(0, 3, 41))[None]
    assert np.abs(thick_and_back(smooth, 1, 4.0, 1.0) - smooth).max() < 1e-3  # a cubic recovers a smooth line


def test_random_thick_slices_make_the_condition_of_the_thin_slice():
    transform = RandThickSlicesd(spacing=(3.0, 3.0), thickness=(1.0, 1.0), noise=(0.0, 0.0))
    transform.set_random_state(0)
    image = torch.from_numpy(phantom((1, 32, 48))[0][None])
    out = transform({"image": image})
    condition = out[CONDITION_KEY]
    assert condition.shape == image.shape and not torch.equal(condition, image)
    assert float((condition - image).abs().mean()) < float(image.abs().mean()) * 0.2  # the same anatomy, blurred
    transform.set_random_state(0)
    assert torch.equal(transform({"image": image})[CONDITION_KEY], condition)  # its randomness is MONAI's
    with pytest.raises(MeddiffError, match="spacing"):
        RandThickSlicesd(spacing=(0.5, 2.0))


def test_the_output_grid_puts_every_new_slice_where_it_lies():
    image, _ = thick_volume(4)
    grid = output_grid(image, UpsampleSpec(factor=4))
    assert (grid.axis, grid.size, grid.spacing) == (2, 45, 1.0)
    assert np.allclose(grid.affine[:3, 2], [0, 0, 1.0]) and np.array_equal(grid.affine[:3, 3], image.affine[:3, 3])
    for j in range(image.array.shape[2]):  # an acquired slice is where the new grid says it is
        assert np.allclose(image.affine @ [0, 0, j, 1], grid.affine @ [0, 0, 4 * j, 1])
    assert output_grid(image, UpsampleSpec()).spacing == 1.0  # default: isotropic, the in-plane voxel size
    assert output_grid(image, UpsampleSpec(spacing=1.5)).size == int(44 / 1.5) + 1


@pytest.mark.parametrize(("spec", "image", "fragment"), [
    ({"factor": 4}, Image(np.zeros((8, 8), np.float32), np.eye(4), "MR"), "3D volume"),
    ({"factor": 4}, Image(np.zeros((8, 8, 1), np.float32), np.eye(4), "MR"), "3D volume"),
    ({"spacing": 5.0}, None, "not finer"),
    ({"spacing": 0.2}, None, "beyond 16"),
    ({}, Image(np.zeros((8, 8, 4), np.float32), np.diag([1.0, 1.5, 4.0, 1.0]), "MR"), "anisotropic"),
])
def test_volumes_that_cannot_be_upsampled_are_refused(spec, image, fragment):
    image = image or thick_volume(4)[0]
    with pytest.raises(MeddiffError, match=fragment):
        output_grid(image, UpsampleSpec(**spec))


@pytest.mark.parametrize(("fields", "fragment"), [
    ({"factor": 0.5}, "above 1"), ({"factor": 100}, "at most 16"), ({"factor": 2, "spacing": 1.0}, "not both"),
    ({"spacing": -1.0}, "positive"), ({"thickness": float("nan")}, "positive"), ({"steps": 0}, "--steps"),
])
def test_bad_specs_are_refused_in_one_line(fields, fragment):
    with pytest.raises(MeddiffError, match=fragment):
        UpsampleSpec(**fields)


def test_cubic_keeps_the_acquired_slices_bit_for_bit_and_integers_integral():
    image, truth = thick_volume(4, integers=True)
    out, report = upsample(image, UpsampleSpec(factor=4, method="cubic"), progress=False)
    assert report.method == "cubic" and out.array.shape == truth.shape
    assert np.array_equal(out.array[:, :, ::4], image.array)
    assert np.array_equal(out.array, np.round(out.array))
    nan = Image(np.where(image.array > 100, np.nan, image.array), image.affine, "MR")
    with pytest.raises(MeddiffError, match="NaN"):
        upsample(nan, UpsampleSpec(factor=4, method="cubic"), progress=False)


def test_auto_checks_each_method_at_the_scale_it_is_applied_and_leaves_ct_padding_out(monkeypatch):
    """In-plane voxels of 0.5 mm, slices 2 mm apart made 1 mm: the planes crossing the slices have 0.5 x 1 mm voxels,
    so the check must hand the methods held-out planes resampled to that, and score no CT padding (-2048 HU)."""
    truth = phantom() * 5 - 500
    truth[:8] = -2048  # the scanner's padding outside the field of view, a band of rows
    thick = slab_average(truth, 2, np.arange(0, 48, 2), 2)
    image = Image(thick, np.diag([0.5, 0.5, 2.0, 1.0]), "CT")
    calls = []

    def recorder(blurred, spacing):  # junk only where the input is padding: no real voxel is touched
        calls.append((blurred.shape, spacing))
        return np.where(blurred < -1.5, 1.0, 0.0)

    monkeypatch.setattr("meddiff.pipelines.upsample._self_restorer", lambda *args: recorder)
    out, report = upsample(image, UpsampleSpec(factor=2, method="auto"), progress=False)
    assert {spacing for _, spacing in calls} == {(0.5, 1.0)}  # the check's call and the application's alike
    assert calls[0][0] == (6, 40, 20)  # held-out planes 2, 6, ... with their second axis at 1 mm
    assert report.check_psnr["self"] == pytest.approx(report.check_psnr["cubic"], abs=1e-4)  # float32 vs 64


def test_the_per_scan_network_starts_from_the_classical_answer_and_learns_the_slices():
    net = smore.network()
    planes = np.random.default_rng(0).random((3, 20, 28)).astype(np.float32)
    assert np.array_equal(smore.residual(net, planes), np.zeros_like(planes))  # untrained: cubic itself
    image, truth = thick_volume(4)
    cubic = upsample(image, UpsampleSpec(factor=4, method="cubic"), progress=False)[0].array
    learned, report = upsample(image, UpsampleSpec(factor=4, method="self", self_steps=120), progress=False)
    assert report.method == "self" and np.array_equal(learned.array[:, :, ::4], image.array)
    between = [k for k in range(truth.shape[2]) if k % 4]
    error = {name: np.abs(a[:, :, between] - truth[:, :, between]).mean()
             for name, a in (("cubic", cubic), ("self", learned.array))}
    assert error["self"] < error["cubic"]  # in-plane detail taught it what the slices hide


def upsampling_module() -> DiffusionModule:
    return DiffusionModule.from_flat(image_shape=(16, 16), image_spacing=(1.0, 1.0), concat_channels=1,
                                     concat_key=CONDITION_KEY, task="upsample", prediction="v",
                                     beta_schedule="cosine", **TINY)


def test_an_upsampling_model_learns_the_residual_over_the_interpolation():
    module = upsampling_module()
    image = torch.rand(2, 1, 16, 16)
    batch = {"image": image, CONDITION_KEY: image.clone()}
    seen = {}

    def spy(x, timesteps, **kwargs):
        seen["input"] = x
        return torch.zeros_like(x[:, :1])

    module.unet.forward = spy
    generator = torch.Generator().manual_seed(0)
    loss_same = module.loss(batch, generator)  # condition = image: the residual (x0) is 0
    assert seen["input"].shape[1] == 2  # [noised residual, condition]
    generator = torch.Generator().manual_seed(0)
    shifted = module.loss({"image": image, CONDITION_KEY: image - 0.5}, generator)
    assert float(shifted) > float(loss_same)  # a residual of 0.5 is a target to learn
    with pytest.raises(MeddiffError, match="concat_channels 1"):
        DiffusionModule.from_flat(image_shape=(16, 16), concat_channels=2, concat_key="x", task="upsample", **TINY)


def test_model_and_auto_paths_run_a_saved_upsampling_model(tmp_path):
    module = upsampling_module()
    folder = module.diffusion_model().save_pretrained(tmp_path / "model")
    from meddiff.model import load_model

    model = load_model(folder)
    image, _ = thick_volume(4)
    spec = UpsampleSpec(factor=4, method="model", seed=3)
    first, report = upsample(image, spec, model, progress=False)
    again, _ = upsample(image, spec, model, progress=False)
    assert report.method == "model" and np.array_equal(first.array, again.array)  # seeded
    assert np.array_equal(first.array[:, :, ::4], image.array)
    chosen, report = upsample(image, UpsampleSpec(factor=4, method="auto", self_steps=20), model, progress=False)
    assert set(report.check_psnr) == {"cubic", "self", "model"}
    assert report.method == max(report.check_psnr, key=report.check_psnr.get) and "held-out" in report.line()
    generator_model = load_model("mri-denoise")
    with pytest.raises(MeddiffError, match="not upsample"):
        upsample(image, spec, generator_model, progress=False)


def test_cli_writes_nifti_with_the_new_geometry(tmp_path, capsys):
    image, truth = thick_volume(4)
    save_image(image, tmp_path / "thick.nii.gz")
    assert main(["upsample", "-i", str(tmp_path / "thick.nii.gz"), "-o", str(tmp_path / "thin.nii.gz"),
                 "--factor", "4", "--method", "cubic"]) == 0
    assert "cubic: 4x through-plane" in capsys.readouterr().out
    out = load_image(tmp_path / "thin.nii.gz")
    assert out.array.shape == truth.shape and np.allclose(out.spacing, (1.0, 1.0, 1.0))
    assert np.allclose(out.affine[:3, 3], image.affine[:3, 3], atol=1e-4)
    assert main(["upsample", "-i", str(tmp_path / "thick.nii.gz"), "-o", str(tmp_path / "x.nii.gz"),
                 "--method", "self", "--model", "mri-denoise"]) == 2
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_thick_dicom_series_comes_back_as_a_thin_derived_series_of_its_study(ct_series_dir, tmp_path):
    source = tmp_path / "series"
    shutil.copytree(ct_series_dir, source)
    assert main(["upsample", "-i", str(source), "-o", str(tmp_path / "thin"), "--format", "dcm", "--factor", "5",
                 "--method", "cubic"]) == 0
    thick = load_image(source)
    thin = load_image(tmp_path / "thin")
    assert thin.array.shape == (16, 16, 21) and np.allclose(thin.spacing, (0.488281, 0.488281, 0.5), atol=1e-5)
    assert np.allclose(thin.affine[:3, 3], thick.affine[:3, 3], atol=1e-3)
    assert np.array_equal(thin.array[:, :, ::5], thick.array)  # the acquired slices, as stored
    files = sorted((tmp_path / "thin").glob("*.dcm"))
    originals = [pydicom.dcmread(f) for f in sorted(source.iterdir())]
    headers = [pydicom.dcmread(f) for f in files]
    assert len(headers) == 21
    assert {h.StudyInstanceUID for h in headers} == {originals[0].StudyInstanceUID}  # the same study
    assert {h.PatientID for h in headers} == {originals[0].PatientID}
    assert len({h.SeriesInstanceUID for h in headers}) == 1 and headers[0].SeriesInstanceUID != \
        originals[0].SeriesInstanceUID
    assert all(h.ImageType[0] == "DERIVED" and float(h.SliceThickness) == pytest.approx(0.5) for h in headers)
    assert sorted(int(h.InstanceNumber) for h in headers) == list(range(1, 22))
    assert all(1 <= len(h.SourceImageSequence) <= 2 for h in headers)
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in ct_series_dir.iterdir())


def test_cli_refuses_a_dcm_file_name_for_a_series(ct_series_dir, tmp_path):
    assert main(["upsample", "-i", str(ct_series_dir), "-o", str(tmp_path / "thin.dcm"), "--factor", "2",
                 "--method", "cubic"]) == 2
    assert not any(tmp_path.iterdir())
