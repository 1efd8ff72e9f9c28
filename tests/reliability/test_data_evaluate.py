"""Manifests and evaluate under bad input and faults: one ``error:`` line, exit 2, and nothing new on disk.

A case table runs ``manifest validate|build|samples|findings`` and ``evaluate`` on small prepared
folders; then the faults: a writer failing (or interrupted) halfway through a sample set, a hidden
temporary left by a killed writer, and a corrupt feature-cache entry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff


def nifti(path: Path, shape=(24, 24), seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.random.default_rng(seed).random(shape, dtype=np.float32) * 100
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def truncate(path: Path, keep: float = 0.6) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def manifest(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps({"modality": "MR", **r}) + "\n" for r in records))
    return path


def temp_left_by_a_kill(folder: Path, name: str = "s0.nii.gz") -> Path:
    """What atomic_path leaves when the writer is SIGKILLed: a hidden, half-written file of the same suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    return truncate(nifti(folder / f".{name}.k3j_x9a1.nii.gz", seed=9), keep=0.3)


def two_images(d: Path) -> None:
    nifti(d / "a.nii.gz", seed=1), nifti(d / "b.nii.gz", seed=2)


def image_folders(d: Path) -> None:
    for folder in ("real", "fake"):
        for i in range(4):
            nifti(d / folder / f"s{i}.nii.gz", seed=i + (10 if folder == "fake" else 0))


def truncated_dicom(d: Path) -> None:
    from pydicom.data import get_testdata_file

    (d / "data").mkdir()
    truncate(Path(shutil.copy(get_testdata_file("CT_small.dcm"), d / "data" / "ct.dcm")), keep=0.9)


def nothing(d: Path) -> None:
    pass


EVALUATE = ["evaluate", "--real", "real", "--fake", "fake", "--features", "meddiff_mri", "--cache", "none"]

# name: (setup(workdir), argv, fragments of the error line)
CASES = {
    # manifest validate
    "validate: no such manifest": (nothing, ["manifest", "validate", "m.jsonl"], ["does not exist"]),
    "validate: not JSON": (lambda d: (d / "m.jsonl").write_text("{image: a}\n"), ["manifest", "validate", "m.jsonl"],
                           ["line 1", "JSON"]),
    "validate: unknown field": (lambda d: manifest(d / "m.jsonl", {"image": "a.nii.gz", "patient_name": "X"}),
                                ["manifest", "validate", "m.jsonl"], ["line 1", "patient_name"]),
    "validate: split 'training'": (lambda d: manifest(d / "m.jsonl", {"image": "a.nii.gz", "split": "training"}),
                                   ["manifest", "validate", "m.jsonl"], ["field 'split'"]),
    "validate: empty manifest": (lambda d: (d / "m.jsonl").write_text("\n"), ["manifest", "validate", "m.jsonl"],
                                 ["no records"]),
    "validate: image missing": (lambda d: manifest(d / "m.jsonl", {"image": "a.nii.gz"}),
                                ["manifest", "validate", "m.jsonl"], ["file not found"]),
    "validate: one image in train and test": (
        lambda d: (two_images(d), manifest(d / "m.jsonl", {"image": "a.nii.gz", "split": "train"},
                                           {"image": "b.nii.gz", "split": "train"},
                                           {"image": "a.nii.gz", "split": "test"})),
        ["manifest", "validate", "m.jsonl"], ["split leak", "line 1 (a.nii.gz, train)", "line 3 (a.nii.gz, test)"]),
    "validate: one image spelt two ways in train and val": (
        lambda d: (two_images(d), (d / "sub").mkdir(), manifest(d / "m.jsonl", {"image": "a.nii.gz", "split": "train"},
                                                                 {"image": "sub/../a.nii.gz", "split": "val"})),
        ["manifest", "validate", "m.jsonl"], ["split leak", "line 1", "line 2"]),
    "validate: one subject in train and val": (
        lambda d: (two_images(d), manifest(d / "m.jsonl", {"image": "a.nii.gz", "split": "train", "subject": "s7"},
                                           {"image": "b.nii.gz", "split": "val", "subject": "s7"})),
        ["manifest", "validate", "m.jsonl"], ["split leak", "subject", "line 1", "line 2"]),
    "validate --deep: a copy of a train image in test": (
        lambda d: (two_images(d), shutil.copy(d / "a.nii.gz", d / "c.nii.gz"),
                   manifest(d / "m.jsonl", {"image": "a.nii.gz", "split": "train"},
                            {"image": "b.nii.gz", "split": "test"}, {"image": "c.nii.gz", "split": "test"})),
        ["manifest", "validate", "m.jsonl", "--deep"], ["split leak", "identical", "line 1", "line 3"]),
    # manifest build
    "build: no such folder": (nothing, ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"],
                              ["not a folder"]),
    "build: only hidden temporaries": (
        lambda d: (temp_left_by_a_kill(d / "data"), nifti(d / "data" / ".out.staging-x1" / "s0.nii.gz")),
        ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"], ["no images found"]),
    "build: files without --modality": (lambda d: nifti(d / "data" / "a.nii.gz"),
                                        ["manifest", "build", "data", "-o", "m.jsonl"], ["--modality"]),
    "build: truncated .nii": (lambda d: (nifti(d / "data" / "a.nii.gz"), truncate(nifti(d / "data" / "b.nii")) ),
                              ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"],
                              ["b.nii", "truncated"]),
    "build: truncated .nii.gz": (lambda d: truncate(nifti(d / "data" / "a.nii.gz", shape=(64, 64, 8))),
                                 ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"],
                                 ["a.nii.gz", "truncated"]),
    "build: truncated DICOM": (truncated_dicom, ["manifest", "build", "data", "-o", "m.jsonl"],
                               ["ct.dcm", "truncated"]),
    "build: manifest exists": (lambda d: (nifti(d / "data" / "a.nii.gz"), (d / "m.jsonl").write_text("mine\n")),
                               ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"],
                               ["already exists", "--overwrite"]),
    "build: fractions sum to 1": (lambda d: nifti(d / "data" / "a.nii.gz"),
                                  ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR",
                                   "--val-fraction", "0.5", "--test-fraction", "0.5"],
                                  ["sum to less than 1"]),
    # manifest samples
    "samples: output folder holds a file": (lambda d: (d / "out").mkdir() or (d / "out" / "mine.txt").write_text("x"),
                                            ["manifest", "samples", "-o", "out", "--only", "dipy_t1_coronal_slice"],
                                            ["not empty", "--overwrite"]),
    "samples: output is a file": (lambda d: (d / "out").write_text("x"),
                                  ["manifest", "samples", "-o", "out", "--only", "dipy_t1_coronal_slice"],
                                  ["is a file"]),
    "samples: unknown --only": (nothing, ["manifest", "samples", "-o", "out", "--only", "brain"], ["invalid choice"]),
    # manifest findings
    "findings: negative --train": (nothing, ["manifest", "findings", "-o", "out", "--train", "-1"], ["negative"]),
    "findings: held_out.json exists": (
        lambda d: (d / "out").mkdir() or (d / "out" / "held_out.json").write_text("[]\n"),
        ["manifest", "findings", "-o", "out", "--train", "4", "--val", "2", "--test", "4"], ["not empty"]),
    "findings: manifest.jsonl exists": (
        lambda d: (d / "out").mkdir() or (d / "out" / "manifest.jsonl").write_text("mine\n"),
        ["manifest", "findings", "-o", "out", "--train", "4", "--val", "2", "--test", "4"], ["not empty"]),
    "findings: no images asked for": (
        nothing, ["manifest", "findings", "-o", "out", "--train", "0", "--val", "0", "--test", "0"], ["positive"]),
    "build: output is a folder": (lambda d: (nifti(d / "data" / "a.nii.gz"), (d / "m.jsonl").mkdir()),
                                  ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR"], ["is a folder"]),
    "findings: output is a file": (lambda d: (d / "out").write_text("x"),
                                   ["manifest", "findings", "-o", "out", "--train", "4"], ["is a file"]),
    # evaluate
    "evaluate -k 0": (image_folders, [*EVALUATE, "-k", "0"], ["-k 0", "1 or more"]),
    "evaluate -k -3": (image_folders, [*EVALUATE, "-k", "-3"], ["-k -3"]),
    "evaluate --metrics ,": (image_folders, [*EVALUATE, "--metrics", ","], ["no metrics"]),
    "evaluate --metrics fid,bogus": (image_folders, [*EVALUATE, "--metrics", "fid,bogus"],
                                     ["unknown metrics", "bogus"]),
    "evaluate: --fake holds only a temporary": (
        lambda d: (image_folders(d), shutil.rmtree(d / "fake"), temp_left_by_a_kill(d / "fake")),
        EVALUATE, ["fake", "holds no images"]),
    "evaluate: no such --real": (lambda d: (image_folders(d), shutil.rmtree(d / "real")), EVALUATE,
                                 ["real", "neither a manifest nor a folder"]),
    "evaluate: --json exists": (lambda d: (image_folders(d), (d / "r.json").write_text("{}\n")),
                                [*EVALUATE, "--json", "r.json"], ["already exists"]),
    "evaluate: --json is a folder": (lambda d: (image_folders(d), (d / "r.json").mkdir()),
                                     [*EVALUATE, "--json", "r.json"], ["is a folder"]),
    "evaluate: --json into a new folder, then bad -k": (image_folders, [*EVALUATE, "--json", "new/r.json", "-k", "0"],
                                                        ["-k 0"]),
    "evaluate: --plot without memorization": (image_folders, [*EVALUATE, "--plot", "p.png"], ["memorization"]),
    "evaluate: --real-split of a plain folder": (image_folders, [*EVALUATE, "--real-split", "test"], ["no splits"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_ends_in_one_line_and_writes_nothing(case, workdir):
    setup, argv, fragments = CASES[case]
    setup(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*argv), *fragments)
    before.assert_unchanged()


class Boom(OSError):
    pass


def fail_after_first(monkeypatch, module, error: BaseException) -> None:
    """``module.save_image`` writes one file, then raises ``error``: a disk filling up, a crash, Ctrl-C."""
    real, calls = module.save_image, []

    def save_image(*args, **kwargs):
        calls.append(args)
        if len(calls) > 1:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "save_image", save_image)


@pytest.mark.parametrize("error, code", [(Boom(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_samples_failing_midway_leave_no_partial_set(error, code, workdir, monkeypatch):
    from meddiff.data import samples

    # a complete older set
    assert run_meddiff("manifest", "samples", "-o", "old", "--only", "dipy_t1_coronal_slice").code == 0
    (workdir / "old" / "mine.txt").write_text("a user's file\n")
    before = Snapshot(workdir)
    fail_after_first(monkeypatch, samples, error)
    argv = ["manifest", "samples", "--only", "dipy_t1_coronal_slice", "dipy_aniso_vox"]
    assert_clean_error(run_meddiff(*argv, "-o", "new/sets/samples"), code=code)
    assert_clean_error(run_meddiff(*argv, "-o", "old", "--overwrite"), code=code)
    before.assert_unchanged()  # no 'new' (nor its parents), no half set in 'old', no staging folder left beside


def test_findings_failing_midway_leave_no_partial_set(workdir, monkeypatch):
    import meddiff.io

    before = Snapshot(workdir)
    fail_after_first(monkeypatch, meddiff.io, Boom(28, "No space left on device"))
    assert_clean_error(run_meddiff("manifest", "findings", "-o", "out", "--train", "4", "--val", "2", "--test", "4"),
                       "No space left")
    before.assert_unchanged()


def test_findings_overwrite_replaces_the_set_and_keeps_other_files(workdir):
    small = ["--train", "4", "--val", "2", "--test", "4"]
    assert run_meddiff("manifest", "findings", "-o", "out", *small).code == 0
    (workdir / "out" / "notes.txt").write_text("mine\n")
    first = (workdir / "out" / "manifest.jsonl").read_text()
    result = run_meddiff("manifest", "findings", "-o", "out", *small, "--seed", "1", "--overwrite")
    assert result.code == 0, result.err
    assert (workdir / "out" / "manifest.jsonl").read_text() != first
    assert (workdir / "out" / "notes.txt").read_text() == "mine\n"
    assert json.loads((workdir / "out" / "held_out.json").read_text())
    assert sorted(p.name for p in workdir.iterdir()) == ["out"]  # no staging folder left beside


def test_build_skips_hidden_temporaries_and_staging_folders(workdir):
    from pydicom.data import get_testdata_file

    nifti(workdir / "data" / "a.nii.gz")
    temp_left_by_a_kill(workdir / "data")
    nifti(workdir / "data" / ".out.staging-x1" / "b.nii.gz")
    dicom = Path(shutil.copy(get_testdata_file("CT_small.dcm"), workdir / "data" / "ct.dcm"))
    truncate(Path(shutil.copy(dicom, workdir / "data" / ".ct.dcm.q1w2e3.dcm")), keep=0.5)  # same series, half written
    result = run_meddiff("manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR", "--allow-ids-in-paths")
    assert result.code == 0, result.err
    images = sorted(json.loads(line)["image"] for line in (workdir / "m.jsonl").read_text().splitlines())
    assert images == ["data/a.nii.gz", "data/ct.dcm"]


@pytest.fixture
def folders(workdir) -> Path:
    image_folders(workdir)
    return workdir


def test_evaluate_does_not_read_a_temporary_left_in_a_plain_folder(folders):
    temp_left_by_a_kill(folders / "fake")
    result = run_meddiff(*EVALUATE, "--metrics", "fid")
    assert result.code == 0, result.err
    assert "fake 4 images" in result.out


def test_corrupt_feature_cache_entry_is_named_dropped_and_recomputed(folders, tmp_path, caplog):
    cache = tmp_path / "cache"
    args = ["evaluate", "--real", "real", "--fake", "fake", "--features", "meddiff_mri", "--cache", cache,
            "--metrics", "fid", "--json"]
    assert run_meddiff(*args, "first.json").code == 0
    entries = sorted(cache.rglob("*.npz"))
    assert len(entries) == 8
    entries[0].write_bytes(b"PK\x03\x04 not a zip any more")  # a torn write by another tool, a bad disk block
    entries[1].write_bytes(b"")
    result = run_meddiff(*args, "again.json")
    assert result.code == 0, result.err
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert str(entries[0]) in warned and str(entries[1]) in warned
    first, again = (json.loads((folders / name).read_text()) for name in ("first.json", "again.json"))
    assert again["views"]["2d"]["fid"] == pytest.approx(first["views"]["2d"]["fid"], rel=1e-6)
    for entry in entries[:2]:
        with np.load(entry) as stored:  # rewritten whole
            assert stored.files


def test_staging_folders_of_killed_writers_are_removed_on_the_next_run(workdir):
    import os
    import subprocess

    from meddiff.data.staging import _owner

    dead = subprocess.Popen(["true"])
    dead.wait()
    host = _owner().split("~")[0]
    stale = workdir / f".out.staging-{host}~{dead.pid}-a1b2"  # what SIGKILL mid-write leaves
    live = workdir / f".out.staging-{host}~{os.getpid()}-c3d4"  # a writer still running
    elsewhere = workdir / f".out.staging-otherhost~{dead.pid}-e5f6"  # a writer on another machine sharing the disk
    for folder in (stale, live, elsewhere):
        nifti(folder / "train_00000.nii.gz")
    result = run_meddiff("manifest", "findings", "-o", "out", "--train", "2", "--val", "0", "--test", "0")
    assert result.code == 0, result.err
    assert not stale.exists() and live.exists() and elsewhere.exists()
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["held_out.json", "manifest.jsonl",
                                                                   "train_00000.nii.gz", "train_00001.nii.gz"]


def test_built_manifests_validate_and_a_random_split_needs_its_flag(workdir):
    for s in range(8):
        for k in range(3):
            nifti(workdir / "data" / f"sub{s}" / f"scan{k}.nii.gz", shape=(4, 4), seed=s * 3 + k)
    common = ["data", "--modality", "MR", "--val-fraction", "0.3", "--test-fraction", "0.3", "--salt", "s"]
    assert run_meddiff("manifest", "build", *common, "-o", "patient.jsonl").code == 0
    assert run_meddiff("manifest", "validate", "patient.jsonl", "--deep").code == 0
    assert run_meddiff("manifest", "build", *common, "-o", "random.jsonl", "--split-by", "random").code == 0
    assert_clean_error(run_meddiff("manifest", "validate", "random.jsonl"), "split leak", "subject",
                       "--allow-shared-subjects")
    assert run_meddiff("manifest", "validate", "random.jsonl", "--allow-shared-subjects").code == 0


def test_an_unwritable_feature_cache_is_named_and_the_evaluation_goes_on(folders, tmp_path, caplog):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be\n")
    result = run_meddiff("evaluate", "--real", "real", "--fake", "fake", "--features", "meddiff_mri",
                         "--cache", blocked, "--metrics", "fid")
    assert result.code == 0, result.err
    assert "fake 4 images" in result.out
    assert any(str(blocked) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert blocked.read_text().startswith("a file")
