"""Numeric bounds and messages that help: every failure found by a reliability run, as a case.

Seeds take one range (0 .. 2**32-1) in every verb; counts that mean hours of work or more disk than there is
are bounded or refused before work; Ctrl-C says, per verb, what it left; an error names what it is about (the
config key, the tensors that differ, the output the full disk was writing, the file given where a folder
goes); a refused fit prints its error line and nothing of Lightning's. No case renders the chest CT, trains
longer than a few steps of 16x16 patches, or leaves anything on disk but its declared output.
"""

from __future__ import annotations

import errno
import logging
import signal
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from harness import Snapshot, assert_clean_error, run_meddiff

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "ddpm_2d.yaml"
SEED_MAX = 2**32 - 1


@pytest.fixture
def no_heavy_work(monkeypatch):
    """The chest CT and the findings' MRI slices fail if loaded: a case that would start real work fails at once."""
    import meddiff.data.drr as drr
    import meddiff.data.findings as findings

    def refuse(*args, **kwargs):
        raise AssertionError("the work started: the arguments were not refused first")

    monkeypatch.setattr(drr, "chest_ct_slab", refuse)
    monkeypatch.setattr(findings, "base_slices", refuse)


def nifti_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), str(folder / "sub-01.nii.gz"))
    return folder


# --- 1. seeds, regexes and trainer limits: one line naming the option, before any work

SEED_VERBS = {
    "manifest drr": ["manifest", "drr", "-o", "out", "--per-slab", "1"],
    "manifest findings": ["manifest", "findings", "-o", "out", "--train", "2", "--val", "0", "--test", "0"],
    "manifest build": ["manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR", "--split-by", "random"],
    "generate": ["generate", "--model", "MODEL", "-o", "out", "-n", "1", "--steps", "2"],
}


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1], ids=["-1", "2**32"])
@pytest.mark.parametrize("verb", list(SEED_VERBS))
def test_every_seed_takes_one_documented_range(verb, seed, tiny_model, workdir, no_heavy_work):
    nifti_folder(workdir / "data")
    argv = [str(tiny_model) if a == "MODEL" else a for a in SEED_VERBS[verb]]
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*argv, "--seed", seed), "--seed", f"0 to {SEED_MAX}", f"not {seed}")
    before.assert_unchanged()


def test_fits_seed_everything_takes_the_same_range(workdir):
    before = Snapshot(workdir)
    result = run_meddiff("fit", "--config", SMOKE, f"--seed_everything={SEED_MAX + 1}")
    assert_clean_error(result, "--seed_everything", f"0 to {SEED_MAX}")
    before.assert_unchanged()


def test_the_seed_range_is_in_every_seeds_help():
    from meddiff.cli.main import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    manifest = verbs["manifest"]._subparsers._group_actions[0].choices
    for sub in (manifest["build"], manifest["drr"], manifest["findings"], verbs["generate"]):
        seed = next(a for a in sub._actions if "--seed" in a.option_strings)
        assert str(SEED_MAX) in seed.help % {"default": seed.default}, sub.prog


def test_an_invalid_subject_pattern_is_refused_in_words(workdir):
    nifti_folder(workdir / "data")
    before = Snapshot(workdir)
    result = run_meddiff("manifest", "build", "data", "-o", "m.jsonl", "--modality", "MR", "--subject-pattern", "(")
    assert_clean_error(result, "--subject-pattern '('", "not a valid regular expression", "missing )")
    before.assert_unchanged()


@pytest.mark.parametrize("setting", [
    "--trainer.max_steps=-5", "--trainer.max_steps=0", "--trainer.max_epochs=-2", "--trainer.min_steps=-1",
    "--trainer.limit_val_batches=1.5", "--trainer.log_every_n_steps=0", "--trainer.accumulate_grad_batches=0",
    "--trainer.check_val_every_n_epoch=0", "--trainer.val_check_interval=0",
])
def test_trainer_limits_are_checked_before_any_run_folder(setting, workdir):
    key, value = setting[2:].split("=")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("fit", "--config", SMOKE, setting), f"{key} must be", f"not {value}")
    before.assert_unchanged()  # no runs/, wandb/, lightning_logs/ or config.yaml


def test_lightnings_own_refusal_of_a_trainer_setting_is_one_line(workdir):
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("fit", "--config", SMOKE, "--trainer.devices=abc"), "trainer settings", "devices")
    before.assert_unchanged()


# --- 2. bounded counts, the plan of a long run, a disk too small

@pytest.mark.parametrize(("argv", "fragments"), [
    (["manifest", "drr", "-o", "out", "--per-slab", "1000000"], ["--per-slab", "1 to 1000", "not 1000000"]),
    (["manifest", "drr", "-o", "out", "--per-slab", "0"], ["--per-slab", "1 to 1000"]),
    (["manifest", "findings", "-o", "out", "--train", "10000000"], ["--train", "100000", "not 10000000"]),
    (["manifest", "findings", "-o", "out", "--val", "100001"], ["--val", "100000"]),
    (["manifest", "findings", "-o", "out", "--test", "100001"], ["--test", "100000"]),
], ids=["per-slab 10**6", "per-slab 0", "train 10**7", "val", "test"])
def test_counts_have_an_upper_bound(argv, fragments, workdir, no_heavy_work):
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*argv), *fragments)
    before.assert_unchanged()


def test_the_cli_and_the_drr_module_agree_on_the_per_slab_bound():
    from meddiff.cli.manifest import MAX_PER_SLAB
    from meddiff.data import drr

    assert MAX_PER_SLAB == drr.MAX_PER_SLAB


def test_a_drr_set_the_disk_cannot_hold_is_refused_before_work(workdir, monkeypatch, no_heavy_work):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    before = Snapshot(workdir)
    result = run_meddiff("manifest", "drr", "-o", "out", "--per-slab", "100")
    assert_clean_error(result, "200 radiographs need about 15.0 MB", "1.0 MB free", "free space")
    before.assert_unchanged()


def test_a_drr_run_says_how_much_is_coming_and_shows_progress(workdir, monkeypatch):
    import meddiff.data.drr as drr
    from meddiff.image import Image

    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    monkeypatch.setattr(drr, "chest_ct_slab", lambda start, stop: lambda: Image(
        np.full((12, 10, 6), -200.0, np.float32), affine, "CT"))  # a tiny CT: the run, not the rendering, is tested
    result = run_meddiff("manifest", "drr", "-o", "out", "--per-slab", "3")
    assert result.code == 0, result.err
    assert "writing 6 radiographs (3 per slab, 2 slabs) to out, about 450.0 kB" in result.err
    assert "6/6" in result.err  # the bar, per file, on stderr
    assert len(list((workdir / "out").glob("drr_*.nii.gz"))) == 6


# --- 3. Ctrl-C / SIGTERM: one honest line per verb, exit 130

def test_an_interrupted_verb_that_keeps_nothing_says_so(workdir, monkeypatch):
    import meddiff.data.samples as samples

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(samples, "save_image", ctrl_c)
    before = Snapshot(workdir)
    result = run_meddiff("manifest", "samples", "-o", "out", "--only", "dipy_t1_coronal_slice")
    assert_clean_error(result, "interrupted — nothing was written; run the command again", code=130)
    before.assert_unchanged()  # true: the set was staged in a hidden folder, now gone


def test_an_interrupted_export_says_its_folder_may_be_partial(tiny_model, workdir, monkeypatch):
    from meddiff.model import DiffusionModel

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DiffusionModel, "save_pretrained", ctrl_c)
    result = run_meddiff("export", tiny_model, workdir / "out", "--dtype", "float16")
    assert_clean_error(result, "interrupted — the output folder may hold part of the model", "--overwrite", code=130)


def test_an_interrupted_generate_says_its_finished_images_are_kept(tiny_model, workdir, monkeypatch):
    import os

    from meddiff.training import predict

    calls, original = [], predict.sample

    def sample_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(predict, "sample", sample_then_ctrl_c)
    result = run_meddiff("generate", "--model", tiny_model, "-o", "out", "-n", "3", "--steps", "2", "--batch-size", "1")
    assert_clean_error(result, "interrupted — the finished images are kept; run the same command again", code=130)
    assert (workdir / "out" / "sample_000000.nii.gz").is_file()


STOP_AT = '''
import os, signal
import lightning.pytorch as pl


class CtrlCAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
'''


def small_fit_config(work: Path, callbacks: list | None = None, **trainer) -> Path:
    """The 2D smoke recipe on 16x16 slices of two tiny volumes, no loggers; written to ``work/c.yaml``."""
    data = work / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        volume = rng.random((20, 20, 4), dtype=np.float32) * 100
        nib.save(nib.Nifti1Image(volume, np.eye(4)), str(data / f"v{i}.nii.gz"))
    (data / "manifest.jsonl").write_text("".join(
        f'{{"image": "v{i}.nii.gz", "modality": "MR", "split": "train"}}\n' for i in range(2)))
    config = yaml.safe_load(SMOKE.read_text())
    config["trainer"].update(default_root_dir="runs/t", enable_progress_bar=False, val_check_interval=None,
                             check_val_every_n_epoch=1000, logger=False, callbacks=callbacks or [], **trainer)
    config["model"]["init_args"]["image"].update(shape=[16, 16], spacing=[1.0, 1.0])
    config["data"]["init_args"].update(manifest=str(data / "manifest.jsonl"), spacing=None, patch_size=[16, 16],
                                       slices_per_volume=2, batch_size=1, modalities=None)
    path = work / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def lightning_records():
    """Every record Lightning's loggers emit while the test runs (its banner included)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)  # as Lightning sets it (an earlier generate in this process quietened it)
    yield records
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_an_interrupted_fit_says_how_to_resume(workdir, monkeypatch, lightning_records):
    (workdir / "stopper.py").write_text(STOP_AT)
    monkeypatch.syspath_prepend(str(workdir))
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"dirpath": "runs/t/checkpoints", "every_n_train_steps": 2, "save_last": True}}
    config = small_fit_config(workdir, [checkpoints, {"class_path": "stopper.CtrlCAt", "init_args": {"step": 3}}],
                              max_steps=10)
    result = run_meddiff("fit", "--config", config)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning set it to SIG_IGN; put back
    assert_clean_error(result, "interrupted — the last checkpoint is", "last.ckpt",
                       "run the same command with --ckpt_path last", code=130)
    assert (workdir / "runs" / "t" / "checkpoints" / "last.ckpt").is_file()
    assert any("GPU available" in r.getMessage() for r in lightning_records)  # held while checking, then shown


# --- 4. messages that say what they are about

def test_a_refused_fit_prints_nothing_of_lightnings(workdir, lightning_records):
    """Refused in before_fit, after the Trainer (and its GPU/TPU banner) exists: the error line alone."""
    config = yaml.safe_load(SMOKE.read_text())
    config["data"]["init_args"]["manifest"] = "missing/manifest.jsonl"
    (workdir / "c.yaml").write_text(yaml.safe_dump(config))
    result = run_meddiff("fit", "--config", "c.yaml")
    assert_clean_error(result, "missing/manifest.jsonl does not exist")
    assert not [r.getMessage() for r in lightning_records]
    assert [line for line in result.err.splitlines() if line.strip()] == [result.err.strip()]


@pytest.mark.parametrize(("setting", "fragments"), [
    ("--model.init_args.lr=foo", ["config key model.init_args.lr", "'foo'", "float"]),
    ("--data.init_args.batch_size=x", ["config key data.init_args.batch_size", "'x'", "int"]),
    ("--trainer.precision=banana", ["config key trainer.precision", "'banana'"]),
    ("--model.init_args.bogus=1", ["config key model.init_args.bogus", "DiffusionModule has no such argument"]),
])
def test_a_config_value_jsonargparse_refuses_names_its_key(setting, fragments, workdir):
    before = Snapshot(workdir)
    line = assert_clean_error(run_meddiff("fit", "--config", SMOKE, setting), *fragments)
    assert "Union subtypes" not in line
    before.assert_unchanged()


def test_a_config_file_value_names_its_key(workdir):
    (workdir / "bad.yaml").write_text("model:\n  init_args:\n    image:\n      shape: [a, b]\n")
    result = run_meddiff("fit", "--config", SMOKE, "--config", "bad.yaml")
    assert_clean_error(result, "config key model.init_args.image.shape", "'a'")


def test_a_checkpoint_that_does_not_fit_the_model_names_the_tensors(workdir):
    import torch

    from meddiff.training import DiffusionModule

    config = small_fit_config(workdir)
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    state = DiffusionModule(**init).state_dict()
    missing = [k for k in state if k.startswith("unet.")][:4]
    for key in missing:
        del state[key]
    state["unet.extra.weight"] = torch.zeros(2)
    torch.save({"state_dict": state, "pytorch-lightning_version": "2.6.6", "global_step": 2, "epoch": 0},
               workdir / "other.ckpt")  # no hyper_parameters: LightningCLI builds the model from the config
    before = Snapshot(workdir)
    result = run_meddiff("fit", "--config", config, "--ckpt_path", "other.ckpt")
    assert_clean_error(result, "other.ckpt does not fit", "4 tensors missing", "1 unexpected",
                       f"missing {missing[0]}, {missing[1]}, {missing[2]}, ...", "unexpected unet.extra.weight")
    before.assert_unchanged()


def test_a_state_dict_mismatch_anywhere_is_one_line_naming_the_tensors(capsys):
    import argparse

    import torch

    from meddiff.cli.main import run

    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    state = dict(net.state_dict())
    del state["0.bias"]
    state["1.weight"] = torch.zeros(5, 3)
    state["x"] = torch.zeros(1)

    def load(args):
        net.load_state_dict(state)  # torch's own error: "Error(s) in loading state_dict for Sequential:" + a line each

    assert run(argparse.Namespace(debug=False, command="x", func=load)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the weights do not fit Sequential: ")
    for fragment in ("1 tensor missing", "missing 0.bias", "1.weight is [5, 3] in the file, [4, 3] in the network",
                     "unexpected x"):
        assert fragment in err


def test_check_fit_names_the_first_few_of_each_kind():
    import torch

    from meddiff.errors import MeddiffError
    from meddiff.weights import check_fit

    net = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(3)])
    with pytest.raises(MeddiffError) as caught:
        check_fit(net, {"a": torch.zeros(1), "b": torch.zeros(1)}, "src", "fix")
    assert "6 tensors missing, 2 unexpected (first: missing 0.weight, 0.bias, 1.weight, ...; unexpected a, b)" in str(
        caught.value)


def test_a_full_disk_names_the_output_and_says_to_free_space(workdir, monkeypatch):
    import meddiff.data.samples as samples

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no file name

    monkeypatch.setattr(samples, "save_image", disk_full)
    before = Snapshot(workdir)
    result = run_meddiff("manifest", "samples", "-o", "out", "--only", "dipy_t1_coronal_slice")
    assert_clean_error(result, "cannot write out: No space left on device", "free space")
    before.assert_unchanged()


@pytest.mark.parametrize("verb", [
    ["generate", "--model", "MODEL", "-n", "1", "--steps", "2"],
    ["manifest", "samples", "--only", "dipy_t1_coronal_slice"],
    ["manifest", "drr", "--per-slab", "1"],
    ["manifest", "findings", "--train", "2", "--val", "0", "--test", "0"],
], ids=["generate", "samples", "drr", "findings"])
@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_file_given_where_a_folder_goes_is_refused_in_words(verb, where, tiny_model, workdir, no_heavy_work):
    (workdir / "notes.txt").write_text("mine")
    out, named = ("notes.txt", "notes.txt is a file — give -o a folder") if where == "file" else (
        "notes.txt/out", "notes.txt is a file, not a folder — give -o a folder")
    argv = [str(tiny_model) if a == "MODEL" else a for a in verb]
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*argv, "-o", out), named)
    before.assert_unchanged()


def test_generate_refuses_fewer_images_than_devices(tiny_model, workdir, monkeypatch):
    import meddiff.generation as generation

    def refuse(*args, **kwargs):  # never launch DDP processes from the test process
        raise AssertionError("prediction started: the device count was not checked first")

    monkeypatch.setattr(generation, "_predict", refuse)
    before = Snapshot(workdir)
    result = run_meddiff("generate", "--model", tiny_model, "-o", "out", "-n", "1", "--steps", "2",
                         "--accelerator", "cpu", "--devices", "2")
    assert_clean_error(result, "-n 1 is fewer images than the 2 processes")
    before.assert_unchanged()


def test_the_python_api_says_how_to_overwrite_from_python(tiny_model, tmp_path):
    from meddiff.errors import MeddiffError
    from meddiff.model import load_model

    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(MeddiffError, match=r"pass --overwrite \(overwrite=True from Python\)"):
        load_model(tiny_model).save_pretrained(tmp_path)
