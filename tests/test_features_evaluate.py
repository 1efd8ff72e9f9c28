"""Feature extractors load third-party weights in their real on-disk formats; evaluate end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_radimagenet_weights

from meddiff import Image, MeddiffError, load_image, save_image
from meddiff.cli.main import main
from meddiff.metrics import frechet_distance
from meddiff.metrics.evaluate import cached_features, evaluate
from meddiff.metrics.features import load_extractor, medicalnet_resnet


@pytest.fixture(scope="module")
def radimagenet_weights(tmp_path_factory):
    """A ResNet-50 state dict laid out as RadImageNet's PyTorch release saves it (nn.Sequential 'backbone.N' keys)."""
    return write_radimagenet_weights(tmp_path_factory.mktemp("weights") / "RadImageNet-ResNet50.pt")


def test_radimagenet_from_its_release_format_gives_2d_and_25d_features(radimagenet_weights, mni_t1):
    extractor = load_extractor("radimagenet_resnet50", radimagenet_weights)
    flat = extractor.features(Image(np.random.default_rng(0).random((100, 120), dtype=np.float32), np.eye(4), "MR"))
    assert list(flat) == ["2d"] and flat["2d"].shape == (1, 2048)
    volume = load_image(mni_t1)
    extractor.slices = 2  # per plane (8 by default), for speed
    views = extractor.features(Image(volume.array[::4, ::4, ::4], volume.affine @ np.diag([4, 4, 4, 1]), "MR"))
    assert sorted(views) == ["axial", "coronal", "sagittal"] and all(v.shape == (2, 2048) for v in views.values())


def test_missing_or_wrong_weights_say_what_to_do(tmp_path, monkeypatch, radimagenet_weights):
    monkeypatch.setenv("MEDDIFF_WEIGHTS", str(tmp_path))
    with pytest.raises(MeddiffError, match=f"put it at {tmp_path}/resnet_10_23dataset.pth"):
        load_extractor("medicalnet_resnet10")
    with pytest.raises(MeddiffError, match="does not fit this network"):
        load_extractor("medicalnet_resnet10", radimagenet_weights)
    (tmp_path / "resnet_10_23dataset.pth").write_text("not a checkpoint")
    with pytest.raises(MeddiffError, match="cannot read the weights .*: not a file of tensors"):
        load_extractor("medicalnet_resnet10")
    with pytest.raises(MeddiffError, match="unknown feature extractor"):
        load_extractor("inception_v9")


def test_medicalnet_from_its_release_format_gives_3d_features(tmp_path, monkeypatch):
    """MedicalNet checkpoints are {'state_dict': {'module.<key>': tensor}} (DataParallel)."""
    torch.manual_seed(0)
    network = medicalnet_resnet(10, 3, n_input_channels=1, shortcut_type="B", bias_downsample=False)
    torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}},
               tmp_path / "resnet_10_23dataset.pth")
    monkeypatch.setenv("MEDDIFF_WEIGHTS", str(tmp_path))
    extractor = load_extractor("medicalnet_resnet10")
    volume = np.zeros((20, 24, 16), np.float32)
    volume[5:15, 6:18, 4:12] = 100 + np.random.default_rng(0).random((10, 12, 8))
    features = extractor.features(Image(volume, np.eye(4), "CT"))
    assert list(features) == ["3d"] and features["3d"].shape == (1, 512)
    with pytest.raises(MeddiffError, match="3D network"):
        extractor.features(Image(volume[:, :, 0], np.eye(4), "CT"))


def test_fid_rises_with_corruption_and_held_out_real_is_close(mni_t1):
    """meddiff's MRI features: FID(real, held-out real) far below FID(real, corrupted held-out),
    rising with the corruption."""
    volume = load_image(mni_t1).array[::3, ::3, 30:160:3]
    extractor = load_extractor("meddiff_mri")
    first, second = volume[..., 0::2], volume[..., 1::2]  # interleaved axial slices: real and held-out real

    def features(slices):
        return np.concatenate([extractor.features(Image(s, np.eye(4), "MR"))["2d"] for s in np.moveaxis(slices, -1, 0)])

    real = features(first)
    rng = np.random.default_rng(0)
    peak = float(volume.max())
    scores = []
    for level in (0.0, 0.05, 0.2):
        noise = rng.standard_normal(second.shape).astype(np.float32)
        scores.append(frechet_distance(real, features(second + level * peak * noise)))
    assert scores == sorted(scores) and scores[0] < scores[1] / 3


def test_features_are_cached_by_file_and_extractor(tmp_path, monkeypatch):
    extractor = load_extractor("meddiff_mri")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(3):
        paths.append(save_image(Image(rng.random((40, 48), dtype=np.float32), np.eye(4), "MR"),
                                tmp_path / f"img{i}.nii.gz"))
    first = cached_features(paths, extractor, tmp_path / "cache", "real")
    assert len(list((tmp_path / "cache" / extractor.identity).glob("*.npz"))) == 3
    monkeypatch.setattr(extractor, "features", lambda image: pytest.fail("the cache was not used"))
    again = cached_features(paths, extractor, tmp_path / "cache", "real")
    np.testing.assert_array_equal(first[1]["2d"], again[1]["2d"])


def test_evaluate_cli_on_folders(tmp_path):
    rng = np.random.default_rng(1)
    base = np.zeros((48, 48), np.float32)
    base[8:40, 10:38] = 100.0
    for folder, noise in (("real", 2.0), ("fake", 6.0)):
        (tmp_path / folder).mkdir()
        for i in range(6):
            save_image(Image(base + noise * rng.standard_normal(base.shape).astype(np.float32), np.eye(4), "MR"),
                       tmp_path / folder / f"s{i}.nii.gz")
    out = tmp_path / "eval.json"
    args = ["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
            "--cache", str(tmp_path / "cache")]
    assert main([*args, "--metrics", "fid,prdc,memorization,paired", "--json", str(out),
                 "--plot", str(tmp_path / "pairs.png")]) == 0
    results = json.loads(out.read_text())
    assert results["real"] == 6 and results["views"]["2d"]["fid"] > 0 and results["paired"]["pairs"] == 6
    assert 0 <= results["views"]["2d"]["precision"] <= 1 and (tmp_path / "pairs.png").stat().st_size > 0
    assert main([*args, "--json", str(out)]) == 2  # exists
    assert main([*args, "--plot", str(tmp_path / "p2.png")]) == 2  # --plot needs memorization
    assert main([*args, "--features", "radimagenet_resnet50", "--weights", str(tmp_path / "none.pt")]) == 2
    assert main([*args, "--metrics", "fid,magic"]) == 2
    assert not (tmp_path / "p2.png").exists()


def test_evaluate_compares_generated_slices_with_real_volumes_through_a_plane(samples_dir):
    extractor = load_extractor("meddiff_mri")
    from meddiff.metrics.evaluate import image_paths

    real = image_paths(samples_dir, "train")
    fake = image_paths(samples_dir, "val")  # a 2D slice
    with pytest.raises(MeddiffError, match="--plane"):
        evaluate(real, fake + fake, extractor, ["fid"])
    results = evaluate(real, fake + fake, extractor, ["fid"], plane="coronal")
    assert list(results["views"]) == ["2d"] and results["views"]["2d"]["fid"] > 0


def test_frd_rises_with_corruption(mni_t1):
    """FRD (radiomics through frd-score) of slice arrays: held-out real slices closer than noisy ones, rising
    with the noise."""
    from meddiff.metrics.evaluate import frechet_radiomics_distance_of_slices

    volume = load_image(mni_t1).array[::3, ::3, 50:140:3]  # slices with brain in them
    rng = np.random.default_rng(0)
    peak = float(volume.max())
    sets = {}
    for name, index, level in (("real", 0, 0.0), ("held_out", 1, 0.0), ("noisy", 1, 0.05), ("noisier", 1, 0.15)):
        sets[name] = [np.abs(volume[:, :, k] + level * peak * rng.standard_normal(volume.shape[:2])).astype(np.float32)
                      for k in range(index, volume.shape[2], 2)]
    scores = [frechet_radiomics_distance_of_slices(sets["real"], sets[name], (1.0, 1.0))
              for name in ("held_out", "noisy", "noisier")]
    assert scores == sorted(scores) and scores[0] < scores[1]


def test_evaluate_refuses_ambiguous_pairs_and_splits_of_plain_folders(tmp_path):
    from meddiff.metrics.evaluate import image_paths, paired_by_name

    image = Image(np.random.default_rng(0).random((24, 24), dtype=np.float32), np.eye(4), "MR")
    for folder in ("a", "b"):
        save_image(image, tmp_path / folder / "scan.nii.gz")
    paths = [tmp_path / "a" / "scan.nii.gz", tmp_path / "b" / "scan.nii.gz"]
    with pytest.raises(MeddiffError, match="file names repeat"):
        paired_by_name(paths, paths[:1])
    with pytest.raises(MeddiffError, match="no splits"):
        image_paths(tmp_path / "a", "train")


def test_feature_cache_key_follows_slices_per_plane():
    extractor = load_extractor("meddiff_mri")
    key = extractor.identity
    extractor.slices = 2
    assert extractor.identity != key and "s2" in extractor.identity


def test_xrv_densenet_from_a_torchxrayvision_state_dict(tmp_path, monkeypatch):
    """torchxrayvision's DenseNet keys (torchvision layout: 'denselayerN.norm1', 'classifier') load into
    MONAI's DenseNet121."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    monai_state = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict()
    xrv_state = {k.replace(".layers.", ".").replace("class_layers.out.", "classifier."): v
                 for k, v in monai_state.items()}
    torch.save(xrv_state, tmp_path / "xrv-densenet121-res224-all.pt")
    extractor = load_extractor("xrv_densenet121", tmp_path / "xrv-densenet121-res224-all.pt")
    chest = np.random.default_rng(0).random((300, 260), dtype=np.float32)
    assert extractor.features(Image(chest, np.eye(4), "DX"))["2d"].shape == (1, 1024)
    import torchxrayvision as xrv

    torch.manual_seed(1)
    model = xrv.models.DenseNet(weights=None, num_classes=18)
    torch.save(model, tmp_path / "release.pt")  # a whole pickled model, as released (torch >= 1.6's zip format)
    torch.save(model, tmp_path / "release-legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's format
    torch.save(model.state_dict(), tmp_path / "state.pt")
    reference = load_extractor("xrv_densenet121", tmp_path / "state.pt").features(Image(chest, np.eye(4), "DX"))["2d"]
    # not even importable: none of its code is needed
    monkeypatch.setitem(__import__("sys").modules, "torchxrayvision", None)
    # read by an allow-listing unpickler, no class of torchxrayvision runs
    for release in ("release.pt", "release-legacy.pt"):
        released = load_extractor("xrv_densenet121", tmp_path / release)
        np.testing.assert_array_equal(released.features(Image(chest, np.eye(4), "DX"))["2d"], reference)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pt")
    with pytest.raises(MeddiffError, match="does not fit this network: 725 tensors missing, 2 unexpected"):
        load_extractor("xrv_densenet121", tmp_path / "pickled.pt")


def test_evaluate_json_is_standard_when_psnr_is_infinite(tmp_path):
    image = Image(np.random.default_rng(0).random((24, 24), dtype=np.float32), np.eye(4), "MR")
    for folder in ("real", "fake"):
        save_image(image, tmp_path / folder / "same.nii.gz")
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--real", str(tmp_path / "real"), "--fake", str(tmp_path / "fake"),
                 "--metrics", "paired", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["paired"]["psnr"] is None  # identical images: +inf, written as null


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """Random weights in torch-fidelity's release format: the state dict of its FeatureExtractorInceptionV3."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    class Unloaded(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})  # nothing is downloaded
        torch.manual_seed(0)
        network = Unloaded("inception-v3-compat", ["2048"])
    for module in network.modules():  # variance-keeping random weights, so the features are not vanishingly small
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), path)
    return path


def test_inception_v3_features_are_torchmetrics_fid_features(inception_weights):
    """On the same weights and 8-bit images, the extractor's features are those torchmetrics' FID accumulates."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = load_extractor("inception_v3", inception_weights)
    rng = np.random.default_rng(0)
    arrays = []
    for _ in range(3):
        array = rng.integers(0, 256, (80, 96)).astype(np.float32)
        array[:3], array[-3:] = 0, 255  # robust min-max leaves these 8-bit values as they are
        arrays.append(array)
    # any units
    ours = np.concatenate([extractor.features(Image(a * 7.5 - 1000, np.eye(4), "CT"))["2d"] for a in arrays])
    assert ours.shape == (3, 2048) and np.isfinite(ours).all() and ours.std() > 0
    fid = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(inception_weights))
    fid.update(torch.stack([torch.from_numpy(a / 255).float().expand(3, -1, -1) for a in arrays]), real=True)
    np.testing.assert_allclose(fid.real_features_sum.numpy(), ours.sum(axis=0), rtol=1e-4,
                               atol=1e-6 * np.abs(ours).max())


def test_inception_v3_weights_from_meddiff_folder_or_torch_hub_cache(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDDIFF_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MeddiffError, match=f"put it at {tmp_path}/weights/weights-inception-2015-12-05-6726825d.pth"):
        load_extractor("inception_v3")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / inception_weights.name).symlink_to(inception_weights)  # where torchmetrics' FID would have downloaded it
    assert load_extractor("inception_v3").name == "inception_v3"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole pickled module is never unpickled
    with pytest.raises(MeddiffError,
                       match=r"holds pickled Python objects \(torch.nn.modules.linear.Linear\), "
                             r"which meddiff never unpickles"):
        load_extractor("inception_v3", tmp_path / "pickled.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(MeddiffError, match="does not fit torch-fidelity's Inception-v3"):
        load_extractor("inception_v3", tmp_path / "other.pth")
