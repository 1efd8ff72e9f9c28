"""The ``meddiff`` command: help, info, convert, manifest, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PYDICOM_TEST_FILES

from meddiff import load_image
from meddiff.cli.main import main

MEDDIFF = str(Path(sys.executable).parent / "meddiff")


def run_cli(*args):
    """The installed console script, as a user runs it."""
    return subprocess.run([MEDDIFF, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


def test_help_lists_subcommands():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in ("info", "convert", "manifest"):
        assert name in result.stdout


def test_info_json(ct_series_dir, capsys):
    assert main(["info", str(ct_series_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [16, 16, 5] and info["modality"] == "CT" and info["orientation"] == "LPS"
    assert info["spacing"] == pytest.approx([0.488281, 0.488281, 2.5])
    assert info["stats"]["min"] <= info["stats"]["median"] <= info["stats"]["max"]


def test_convert_dicom_folder_to_nifti_keeps_geometry(ct_series_dir, tmp_path, capsys):
    out = tmp_path / "ct.nii.gz"
    assert main(["convert", str(ct_series_dir), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_allclose(load_image(out).affine, load_image(ct_series_dir).affine, atol=1e-5)
    assert main(["convert", str(ct_series_dir), str(out)]) == 2  # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(ct_series_dir), str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{tmp}/missing.nii.gz"], "does not exist"),
        (["info", "{tmp}/cut.dcm"], "cannot"),
        (["convert", "{tmp}/cut.dcm", "{tmp}/out.nii.gz"], "cannot"),
        (["convert", str(PYDICOM_TEST_FILES / "CT_small.dcm"), "{tmp}/out.nii.gz", "--template",
          str(PYDICOM_TEST_FILES / "CT_small.dcm")], "--template is for DICOM output"),
        (["convert", str(PYDICOM_TEST_FILES / "CT_small.dcm"), "{tmp}/out.dcm", "--format", "seg"], "--template"),
        (["manifest", "validate", "{tmp}/bad.jsonl"], "line 2: field 'modality'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, args, message):
    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:4000])
    (tmp_path / "bad.jsonl").write_text('{"image": "a.nii.gz", "modality": "MR"}\n{"image": "b.nii.gz"}\n')
    result = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "out.dcm").exists()


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "info", tmp_path / "missing.nii.gz")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_manifest_build_and_validate(ct_series_dir, multi_series_dir, tmp_path, capsys):
    shutil.copytree(ct_series_dir, tmp_path / "data" / "ct")
    shutil.copytree(multi_series_dir / "CR1", tmp_path / "data" / "cr")
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "build", str(tmp_path / "data"), "-o", str(out), "--salt", "s"]) == 0
    assert "2 records" in capsys.readouterr().out
    assert main(["manifest", "validate", str(out), "--deep"]) == 0
    assert "2 valid records" in capsys.readouterr().out


def test_manifest_samples(tmp_path, capsys):
    assert main(["manifest", "samples", "-o", str(tmp_path), "--only", "dipy_t1_coronal_slice"]) == 0
    assert "val 1" in capsys.readouterr().out
    assert (tmp_path / "dipy_t1_coronal_slice.nii.gz").exists()
    assert main(["manifest", "samples", "-o", str(tmp_path), "--only", "dipy_t1_coronal_slice"]) == 2  # no overwrite
