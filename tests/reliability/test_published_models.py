"""Published models that are broken or unsafe are refused by ``meddiff import`` in one line, with nothing written.

MONAI model-zoo bundles (the BraTS 2D layout of ``tests/test_hub_bundles.py``): a truncated checkpoint, a missing
component, weights whose shapes do not fit the config, a pickle payload in a ``.pt`` (it would create a marker
file), ``$`` code where meddiff needs a value, an unknown network class, a text-conditioned bundle without its
text encoder. diffusers pipeline folders (the tiny Stable Diffusion of ``tests/test_hub_diffusers.py``): a custom
pipeline's ``.py`` file, a config asking for remote code (``auto_map``), a component of another class, a missing
component, a pickle payload in a ``.bin``. Each exits 2 with one ``error:`` line; the output folder and any staging
folder never appear, and the marker is never created. ``--overwrite`` of ``import`` and ``export-bundle`` replaces
only what meddiff wrote there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from harness import assert_clean_error, run_meddiff
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from test_hub_bundles import APACHE, BRATS_2D, BRATS_2D_META, CXR, CXR_META, arguments, seeded, write_bundle
from test_hub_diffusers import sd_folder  # noqa: F401 - the fixture


class OpenMarker:
    """Code a pickle runs on loading: it creates the marker file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def edit(root: Path, entry: str, key: str, value) -> None:
    path = root / "configs" / "inference.json"
    config = json.loads(path.read_text())
    config[entry][key] = value
    path.write_text(json.dumps(config))


def brats(root: Path) -> Path:
    autoencoder = seeded(AutoencoderKL(**arguments(BRATS_2D, "autoencoder_def")), 2)
    unet = seeded(DiffusionModelUNet(**arguments(BRATS_2D, "network_def")), 3)
    return write_bundle(root, BRATS_2D, BRATS_2D_META, APACHE,
                        {"model_autoencoder.pt": autoencoder.state_dict(), "model.pt": unet.state_dict()})


def cxr_without_text_encoder(root: Path) -> Path:
    autoencoder = seeded(AutoencoderKL(**arguments(CXR, "autoencoder_def")), 7)
    unet = seeded(DiffusionModelUNet(**arguments(CXR, "network_def")), 8)
    return write_bundle(root, CXR, CXR_META, APACHE, {"autoencoder.pt": autoencoder.state_dict(),
                                                      "model.pt": unet.state_dict()})


BUNDLE_CASES = {
    "truncated checkpoint": (lambda root, marker: (root / "models" / "model.pt").write_bytes(
        (root / "models" / "model.pt").read_bytes()[:500]), "cannot read the bundle checkpoint"),
    "missing component": (lambda root, marker: (root / "models" / "model_autoencoder.pt").unlink(),
                          "model_autoencoder.pt is missing"),
    "shapes that do not fit": (lambda root, marker: torch.save(
        {k: torch.zeros(3) for k in torch.load(root / "models" / "model.pt")}, root / "models" / "model.pt"),
        "does not fit the bundle's config"),
    "pickle payload": (lambda root, marker: torch.save({"weights": torch.zeros(2), "payload": OpenMarker(marker)},
                                                       root / "models" / "model.pt"), "never unpickles"),
    "code in a value": (lambda root, marker: edit(root, "network_def", "channels", "$[8, 16] + list(range(3))"),
                        "is code"),
    "unknown network class": (lambda root, marker: edit(root, "network_def", "_target_", "scripts.nets.MyUNet"),
                              "scripts.nets.MyUNet, which meddiff does not know"),
}


def check_refused(work: Path, result, message: str, marker: Path, keep: set[str]) -> None:
    assert_clean_error(result, message)
    assert not marker.exists()
    assert {p.name for p in work.iterdir()} == keep  # no output, no staging folder


@pytest.mark.parametrize("case", list(BUNDLE_CASES))
def test_a_broken_bundle_is_refused_and_nothing_is_written(case, tmp_path):
    root, marker = brats(tmp_path / "bundle"), tmp_path / "marker"
    breaks, message = BUNDLE_CASES[case]
    breaks(root, marker)
    check_refused(tmp_path, run_meddiff("import", str(root), str(tmp_path / "out")), message, marker, {"bundle"})


def test_a_text_conditioned_bundle_without_its_text_encoder_is_refused(tmp_path):
    root = cxr_without_text_encoder(tmp_path / "bundle")
    check_refused(tmp_path, run_meddiff("import", str(root), str(tmp_path / "out")),
                  "--text-encoder FOLDER", tmp_path / "marker", {"bundle"})


def break_folder(folder: Path, case: str, marker: Path) -> None:
    if case == "custom code":
        (folder / "pipeline.py").write_text("open('marker', 'w')\n")
    elif case == "remote code":
        config = json.loads((folder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    elif case == "another unet class":
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "unet": ["my_pkg", "MyUNet"]}))
    elif case == "missing component":
        shutil.rmtree(folder / "vae")
    else:  # a pickle payload where the weights were
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save({"conv_in.weight": torch.zeros(1), "payload": OpenMarker(marker)},
                   folder / "unet" / "diffusion_pytorch_model.bin")


FOLDER_CASES = {"custom code": "Python code", "remote code": "auto_map", "another unet class": "MyUNet",
                "missing component": "vae/config.json is missing", "pickle payload": "never unpickles"}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_diffusers_folder_asking_for_code_or_broken_is_refused(case, sd_folder, tmp_path):  # noqa: F811
    folder, marker = tmp_path / "pipeline", tmp_path / "marker"
    shutil.copytree(sd_folder[0], folder)
    break_folder(folder, case, marker)
    check_refused(tmp_path, run_meddiff("import", str(folder), str(tmp_path / "out")), FOLDER_CASES[case], marker,
                  {"pipeline"})


def test_overwrite_replaces_only_what_meddiff_wrote(tmp_path):
    """``import --overwrite`` and ``export-bundle --overwrite`` replace their own earlier output, and refuse a folder
    holding anything else (a user's file, a bundle's run output) or a file in its place, deleting nothing."""
    root = brats(tmp_path / "bundle")
    out = tmp_path / "model"
    assert run_meddiff("import", str(root), str(out)).code == 0
    assert run_meddiff("import", str(root), str(out), "--overwrite").code == 0  # its own folder: replaced
    (out / "notes.txt").write_text("mine")
    assert_clean_error(run_meddiff("import", str(root), str(out), "--overwrite"), "did not write (notes.txt)")
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    (tmp_path / "file").write_text("mine")
    assert_clean_error(run_meddiff("import", str(root), str(tmp_path / "file"), "--overwrite"), "is a file")
    assert (tmp_path / "file").read_text() == "mine"
    (out / "notes.txt").unlink()
    exported = tmp_path / "exported"
    assert run_meddiff("export-bundle", str(out), str(exported), "--steps", "2").code == 0
    assert run_meddiff("export-bundle", str(out), str(exported), "--steps", "2", "--overwrite").code == 0
    (exported / "output").mkdir()
    (exported / "output" / "sample.nii.gz").write_bytes(b"a run's result")
    assert_clean_error(run_meddiff("export-bundle", str(out), str(exported), "--overwrite"), "did not write (output)")
    assert (exported / "output" / "sample.nii.gz").read_bytes() == b"a run's result"
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]
