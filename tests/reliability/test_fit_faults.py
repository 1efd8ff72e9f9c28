"""``meddiff fit`` under bad input and faults: check first, then create; no code from a checkpoint;
sample grids of report-conditioned models; a SIGKILLed run resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from harness import TINY_UNET, Snapshot, assert_clean_error, run_meddiff

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "smoke" / "ddpm_2d.yaml"


def write_volumes(folder: Path, n: int = 4, split: str = "train", reports: list[str] | None = None,
                  shape=(20, 20, 8)) -> Path:
    """``n`` small MR volumes with a bright block each (different per volume) and their manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(list(folder.glob("*.nii.gz"))))
    lines = []
    for i in range(n):
        image = np.zeros(shape, np.float32)
        block = image[1 + i : 1 + i + shape[0] // 2, 2:-2, :]
        block[...] = 100 + rng.normal(0, 20, block.shape)
        name = f"{split}{i}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / name)
        record = {"image": name, "modality": "MR", "split": split}
        if reports:
            record["report"] = reports[i % len(reports)]
        lines.append(json.dumps(record))
    manifest = folder / "manifest.jsonl"
    with open(manifest, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    return manifest


def fit_config(manifest: Path | str, loggers: bool = True, root: str = "runs/t", callbacks: list | None = None,
               **trainer) -> dict:
    """The 2D smoke recipe on 16x16 patches: the loggers and checkpoints a real run starts (relative to the cwd)."""
    config = yaml.safe_load(SMOKE.read_text())
    config["trainer"].update(default_root_dir=root, enable_progress_bar=False, val_check_interval=None,
                             check_val_every_n_epoch=1000)
    if loggers:
        config["trainer"]["logger"] = [
            {"class_path": "lightning.pytorch.loggers.WandbLogger",
             "init_args": {"project": "meddiff", "save_dir": root}},
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root}},
        ]
    else:
        config["trainer"]["logger"] = False
    config["trainer"]["callbacks"] = callbacks if callbacks is not None else [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": f"{root}/checkpoints", "every_n_train_steps": 2, "save_last": True}}
    ]
    config["trainer"].update(trainer)
    config["model"]["init_args"]["image"].update(shape=[16, 16], spacing=[1.0, 1.0])
    config["data"]["init_args"].update(manifest=str(manifest), spacing=None, patch_size=[16, 16], slices_per_volume=2,
                                       batch_size=1)
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


class Payload:
    """Unpickling it runs ``touch MARKER``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- the case table: each prepares a bad input in the (empty) working folder and returns argv + a fragment


def case_missing_config(work: Path):
    return ["--config", "nope.yaml"], "nope.yaml does not exist"


def case_broken_yaml(work: Path):
    (work / "broken.yaml").write_text("trainer:\n  max_steps: [1,\n")
    return ["--config", "broken.yaml"], "not valid YAML at line"


def case_config_not_a_mapping(work: Path):
    (work / "list.yaml").write_text("- trainer\n- model\n")
    return ["--config", "list.yaml"], "not a mapping"


def case_unknown_option(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    return ["--config", "c.yaml", "--model.init_args.bogus=1"], "meddiff fit --help"


def case_smoke_config_on_a_fresh_clone(work: Path):
    """configs/smoke/ddpm_2d.yaml as shipped: its manifest is made by a command the config names."""
    return ["--config", str(SMOKE)], "make it with `meddiff manifest samples -o demo_out/samples`"


def case_report_smoke_config_without_its_text_encoder(work: Path):
    """configs/smoke/report_2d.yaml as shipped: its text encoder is written by configs/clip_findings.yaml."""
    return ["--config", str(REPO / "configs" / "smoke" / "report_2d.yaml")], "make it with `meddiff fit --config"


def case_missing_manifest(work: Path):
    write_config(work / "c.yaml", fit_config(work / "none" / "manifest.jsonl"))
    return ["--config", "c.yaml"], "meddiff manifest build"


def case_manifest_names_a_missing_image(work: Path):
    manifest = write_volumes(work / "data")
    (work / "data" / "train1.nii.gz").unlink()
    write_config(work / "c.yaml", fit_config(manifest))
    return ["--config", "c.yaml"], "file not found"


def case_nan_image(work: Path):
    manifest = write_volumes(work / "data")
    image = nib.load(work / "data" / "train2.nii.gz")
    array = np.asarray(image.dataobj).copy()
    array[5, 5, 2] = np.nan
    nib.save(nib.Nifti1Image(array, image.affine), work / "data" / "train2.nii.gz")
    write_config(work / "c.yaml", fit_config(manifest))
    return ["--config", "c.yaml"], "train2.nii.gz: image has 1 NaN"


def case_missing_checkpoint(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    return ["--config", "c.yaml", "--ckpt_path", "gone.ckpt"], "gone.ckpt does not exist"


def case_pickle_payload_checkpoint(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    (work / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(work / "MARKER")}))
    return ["--config", "c.yaml", "--ckpt_path", "evil.ckpt"], "refusing checkpoint evil.ckpt"


def case_torch_zip_payload_checkpoint(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    torch.save({"state_dict": {}, "x": Payload(work / "MARKER")}, work / "evil.ckpt")
    return ["--config", "c.yaml", "--ckpt_path=evil.ckpt"], "refusing checkpoint evil.ckpt"


def case_payload_as_last_checkpoint(work: Path):
    """``--ckpt_path last`` resolves to a planted payload: refused before Lightning opens it."""
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest, root="runs/t"))
    (work / "runs" / "t" / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "x": Payload(work / "MARKER")}, work / "runs" / "t" / "checkpoints" / "last.ckpt")
    return ["--config", "c.yaml", "--ckpt_path", "last"], "last.ckpt: it holds objects other than tensors"


def case_checkpoint_that_is_not_lightning(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    torch.save(torch.zeros(3), work / "t.ckpt")
    return ["--config", "c.yaml", "--ckpt_path", "t.ckpt"], "not a Lightning checkpoint"


def case_weights_only_false(work: Path):
    manifest = write_volumes(work / "data")
    write_config(work / "c.yaml", fit_config(manifest))
    return ["--config", "c.yaml", "--weights_only=false"], "weights_only=true"


CASES = [
    case_missing_config, case_broken_yaml, case_config_not_a_mapping, case_unknown_option,
    case_smoke_config_on_a_fresh_clone, case_report_smoke_config_without_its_text_encoder, case_missing_manifest,
    case_manifest_names_a_missing_image, case_nan_image, case_missing_checkpoint, case_pickle_payload_checkpoint,
    case_torch_zip_payload_checkpoint, case_payload_as_last_checkpoint, case_checkpoint_that_is_not_lightning,
    case_weights_only_false,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_fails_in_one_line_before_any_run_folder(case, workdir):
    argv, fragment = case(workdir)
    before = Snapshot(workdir)
    result = run_meddiff("fit", *argv)
    assert_clean_error(result, fragment)
    before.assert_unchanged()  # no runs/, lightning_logs/, wandb/, config.yaml or checkpoint appeared
    assert not (workdir / "MARKER").exists(), "a checkpoint ran code"


# --- sample grids of a report-conditioned model

WORDS = ["no", "acute", "abnormality", "a", "small", "large", "lesion", "in", "the", "left", "right", "region"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A tiny BERT in the Hugging Face folder format (as tests/test_encoders.py makes it)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=16).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("prompts", [None, ["a large lesion in the left region."]],
                         ids=["val_reports", "given_prompts"])
def test_sample_grid_of_a_report_conditioned_model_uses_fixed_prompts(prompts, bert_dir, tmp_path):
    import lightning.pytorch as pl

    from meddiff.data.datamodule import ManifestDataModule
    from meddiff.training import DiffusionModule
    from meddiff.training.callbacks import SampleGrid

    train_reports = ["no acute abnormality.", "a small lesion in the right region."]
    val_reports = ["a large lesion in the left region.", "no acute abnormality."]
    write_volumes(tmp_path / "data", n=2, reports=train_reports, shape=(16, 16, 4))
    manifest = write_volumes(tmp_path / "data", n=2, split="val", reports=val_reports, shape=(16, 16, 4))
    data = ManifestDataModule(str(manifest), spatial_dims=2, slices_per_volume=1, batch_size=2)
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(spatial_dims=2, image_shape=(16, 16), text_encoder=f"hf:{bert_dir}", **TINY_UNET)
    grid = SampleGrid(every_n_steps=2, n=3, steps=2, **({"prompts": prompts} if prompts else {}))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[grid],
                         default_root_dir=tmp_path / "run")
    trainer.fit(module, data)
    expected = prompts or val_reports
    assert grid.grid_prompts == [expected[i % len(expected)] for i in range(3)]
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()


# --- SIGKILL mid-fit, then --ckpt_path last: the weights of an uninterrupted run

KILLER = '''
import os, signal
import lightning.pytorch as pl


class KillAt(pl.Callback):
    """At the end of optimizer step ``step`` (before that step's checkpoint is written): SIGKILL this
    process (``hard``), or fail as a crash would (an in-process run)."""

    def __init__(self, step: int, hard: bool = True):
        self.step = step
        self.hard = hard

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.hard:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("crashed")
'''


@pytest.mark.parametrize("every,kill,steps", [(3, 4, 6), (4, 5, 8)], ids=["sigkill_mid_epoch", "crash_at_epoch_end"])
def test_killed_fit_then_resume_gives_the_weights_of_an_uninterrupted_run(every, kill, steps, tmp_path, monkeypatch):
    """4 volumes x 2 random slices, random 16x16 crops, batch 1: 4 steps an epoch. SIGKILL in a
    subprocess: checkpoints every 3 steps, the run dies in step 4 (last.ckpt: step 3, mid-epoch 0),
    the resumed run goes on to step 6 (mid-epoch 1). In-process crash (no torch import to pay): a
    checkpoint at the end of epoch 0 (step 4), resumed to step 8. Order, slices, crops, noise, EMA and
    optimizer all as in one straight run, bit for bit."""
    manifest = write_volumes(tmp_path / "data", n=4, shape=(24, 22, 8))
    (tmp_path / "killer.py").write_text(KILLER)
    monkeypatch.syspath_prepend(str(tmp_path))
    hard = kill == 4

    def config(name: str, kill: int | None = None) -> Path:
        checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": str(tmp_path / name / "checkpoints"), "every_n_train_steps": every,
                                     "save_last": True, "save_top_k": -1}}
        callbacks = [checkpoints] + (
            [{"class_path": "killer.KillAt", "init_args": {"step": kill, "hard": hard}}] if kill else [])
        cfg = fit_config(manifest, loggers=False, root=str(tmp_path / name), callbacks=callbacks, max_steps=steps,
                         enable_model_summary=False)
        return write_config(tmp_path / f"{name}.yaml", cfg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed run's arithmetic (OMP_NUM_THREADS=1), to the last bit
    try:
        if hard:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1",
                   "WANDB_MODE": "offline"}
            killed = subprocess.run([sys.executable, "-m", "meddiff.cli.main", "fit",
                                     "--config", str(config("resumed", kill=kill))],
                                    cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
            assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        else:
            assert_clean_error(run_meddiff("fit", "--config", config("resumed", kill=kill), cwd=tmp_path), "crashed")
        assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == every
        assert run_meddiff("fit", "--config", config("resumed"), "--ckpt_path", "last", cwd=tmp_path).code == 0
        assert run_meddiff("fit", "--config", config("straight"), cwd=tmp_path).code == 0
    finally:
        torch.set_num_threads(threads)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():  # raw and EMA weights, bit for bit
        assert torch.equal(b["state_dict"][key], value), key
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for key in state_a:
        assert torch.equal(state_a[key]["exp_avg_sq"], state_b[key]["exp_avg_sq"]), key


def test_resume_from_a_checkpoint_of_an_older_meddiff_with_flat_hyperparameters(tmp_path, monkeypatch):
    """A checkpoint written before the arguments were nested holds flat hyperparameters: ``--ckpt_path`` migrates
    them (``meddiff.training.migrate``) and training continues."""
    from meddiff.training.migrate import FLAT_KEYS

    monkeypatch.chdir(tmp_path)
    manifest = write_volumes(tmp_path / "data")
    write_config(tmp_path / "c.yaml", fit_config(manifest, loggers=False, max_steps=2))
    assert run_meddiff("fit", "--config", "c.yaml", cwd=tmp_path).code == 0
    checkpoint = torch.load(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt", weights_only=True)
    nested = checkpoint["hyper_parameters"]
    flat = {k: v for k, v in nested.items() if k not in ("unet", "schedule", "image", "conditioning")}
    flat.update({old: nested[group][field] for old, (group, field) in FLAT_KEYS["diffusion"].items()})
    torch.save({**checkpoint, "hyper_parameters": flat}, tmp_path / "old.ckpt")
    result = run_meddiff("fit", "--config", "c.yaml", "--trainer.max_steps=3", "--ckpt_path", "old.ckpt", cwd=tmp_path)
    assert result.code == 0, result.err[-2000:]
    assert torch.load(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
