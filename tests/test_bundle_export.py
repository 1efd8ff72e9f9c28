"""meddiff models as MONAI bundles: ``python -m monai.bundle run`` on the exported folder writes the image that
``meddiff generate`` makes from the same seed, for a pixel-space and a latent model."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from test_hub_bundles import seeded

from meddiff.cli.main import main
from meddiff.model import DiffusionModel, ModelConfig


def pixel_model(folder):
    config = ModelConfig(unet={"channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8,
                               "norm_num_groups": 8}, schedule={"prediction": "v", "beta_schedule": "cosine"},
                         image={"shape": [16, 16], "spacing": [0.7, 0.7], "modality": "MR",
                                "intensity_range": (0.0, 800.0)})
    model = DiffusionModel(config)
    seeded(model.unet, 1)
    return model.save_pretrained(folder)


def latent_model(folder):
    config = ModelConfig(unet={"in_channels": 1, "out_channels": 1, "channels": [8, 16, 16, 32],
                               "attention_levels": [False, True, True, True], "num_head_channels": [0, 8, 8, 8],
                               "num_res_blocks": 2, "norm_num_groups": 8, "include_fc": False},
                         schedule={"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195},
                         autoencoder={"channels": [8, 16, 16], "latent_channels": 1, "num_res_blocks": 2,
                                      "norm_num_groups": 8, "with_nonlocal_attn": True, "include_fc": False,
                                      "scale_factor": 0.8},
                         image={"shape": [32, 32], "modality": "CT", "intensity_range": (-1000.0, 1000.0)})
    model = DiffusionModel(config)
    seeded(model.unet, 2)
    seeded(model.autoencoder, 3)
    return model.save_pretrained(folder)


@pytest.mark.parametrize("make", [pixel_model, latent_model])
def test_monai_bundle_run_writes_what_meddiff_generate_makes(make, tmp_path):
    folder = make(tmp_path / "model")
    bundle = tmp_path / "bundle"
    assert main(["export-bundle", str(folder), str(bundle), "--steps", "10", "--seed", "4"]) == 0
    assert sorted(p.name for p in bundle.iterdir()) == ["configs", "docs", "models"]
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    targets = [v["_target_"] for v in config.values() if isinstance(v, dict) and "_target_" in v]
    assert all(t.startswith(("monai.", "torch.")) for t in targets)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)  # plain tensors
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"],
                          cwd=bundle, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = nib.load(next((bundle / "output").glob("*.nii.gz")))
    samples = tmp_path / "samples"
    assert main(["generate", "--model", str(folder), "-o", str(samples), "-n", "1", "--seed", "4",
                 "--scheduler", "ddim", "--steps", "10"]) == 0
    ours = nib.load(next(samples.glob("*.nii.gz")))
    scale = np.abs(np.asarray(ours.dataobj)).max()
    np.testing.assert_allclose(np.asarray(theirs.dataobj).squeeze(), np.asarray(ours.dataobj).squeeze(),
                               atol=1e-4 * scale)
    np.testing.assert_allclose(theirs.affine, ours.affine)


@pytest.mark.parametrize(("model", "message"), [("mri-denoise", "denoising prior"),
                                                  ("mri-inpaint", "concatenated channels")])
def test_a_model_without_a_bundle_sampling_loop_is_refused_and_nothing_written(model, message, tmp_path, capsys):
    assert main(["export-bundle", model, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
