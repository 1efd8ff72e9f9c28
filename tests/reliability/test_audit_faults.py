"""``meddiff audit`` under bad concept files, empty or missing image sets, predictions that do not match the images,
encoders that cannot be loaded and bad options.

The promise: each is refused with one line naming what is wrong and what to do, and nothing is written (no report
folder, nothing in an existing one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff, verb_args

from meddiff import Image
from meddiff.io import save_image

CONCEPTS = "reference: normal study\nhyperintense: a hyperintense lesion\nleft: a lesion in the left hemisphere\n"


@pytest.fixture(scope="module")
def own_clip(tmp_path_factory) -> Path:
    """A meddiff CLIP export (untrained) whose vocabulary comes from a small findings set."""
    import torch

    from meddiff.cli.main import main
    from meddiff.training.clip import ClipModule

    folder = tmp_path_factory.mktemp("clip")
    assert main(["manifest", "findings", "-o", str(folder / "data"), "--train", "8", "--val", "0", "--test", "0"]) == 0
    torch.manual_seed(0)
    ClipModule(str(folder / "data" / "manifest.jsonl"), embed_dim=16, text_width=32, text_heads=2,
               vocab_size=200).save_pretrained(folder / "clip")
    return folder / "clip"


def write_inputs(work: Path) -> None:
    """Sets a/ and b/ of three slices, one/ of one, empty/, the concepts file and predictions CSVs."""
    rng = np.random.default_rng(0)
    for name, count in (("a", 3), ("b", 3), ("one", 1)):
        (work / name).mkdir()
        for k in range(count):
            save_image(Image(rng.random((20, 24), dtype=np.float32), np.eye(4), "MR"), work / name / f"{k}.nii.gz")
    (work / "empty").mkdir()
    (work / "concepts.txt").write_text(CONCEPTS)
    files = {
        "empty.txt": "# nothing but a comment\n\n",
        "duplicated.txt": CONCEPTS + "Left: the left side\n",
        "too_long.txt": f"lesion: {'a very long prompt ' * 30}\n",
        "no_prompt.txt": "lesion: |\n",
        "many_tokens.txt": f"lesion: {'lesion ' * 120}\n",
        "preds_extra.csv": "image,label,prediction\n" + "".join(f"a/{k}.nii.gz,1,0\n" for k in range(3))
                           + "b/0.nii.gz,1,1\n",
        "preds_missing.csv": "image,label,prediction\na/0.nii.gz,1,0\na/1.nii.gz,1,1\n",
        "preds_twice.csv": "image,label,prediction\na/0.nii.gz,1,0\na/0.nii.gz,1,0\na/1.nii.gz,1,1\n"
                           "a/2.nii.gz,0,0\n",
        "preds_columns.csv": "image,label\na/0.nii.gz,1\n",
        "preds_header_only.csv": "image,label,prediction\n",
        "preds_all_right.csv": "image,label,prediction\n" + "".join(f"a/{k}.nii.gz,1,1\n" for k in range(3)),
    }
    for name, text in files.items():
        (work / name).write_text(text)
    (work / "binary.txt").write_bytes(b"\xff\xfe\x00lesion\x00\x81")
    (work / "not_a_clip").mkdir()
    (work / "report_file").write_text("a file where the report folder should go\n")
    (work / "kept").mkdir()
    (work / "kept" / "notes.txt").write_text("the user's own file\n")


AB = ["a", "b"]
CASES = {  # name: (the sets, option changes, what the error says)
    "empty concepts file": (AB, ["--concepts", "empty.txt"], "names no concepts"),
    "duplicated concept": (AB, ["--concepts", "duplicated.txt"], "already defined on line 3"),
    "prompt too long": (AB, ["--concepts", "too_long.txt"], "too long"),
    "concept without a prompt": (AB, ["--concepts", "no_prompt.txt"], "has no prompt"),
    "prompt over the text tower's tokens": (AB, ["--concepts", "many_tokens.txt"], "tokens"),
    "no concepts file": (AB, ["--concepts", "missing.txt"], "no such concepts file"),
    "binary concepts file": (AB, ["--concepts", "binary.txt"], "cannot be read as UTF-8"),
    "a folder with no images": (["a", "empty"], [], "holds no images"),
    "a set that does not exist": (["a", "nowhere"], [], "neither a manifest nor a folder"),
    "a set of one image": (["a", "one"], [], "at least 2 images"),
    "one set without --predictions": (["a"], [], "give two image sets"),
    "two sets with --predictions": (AB, ["--predictions", "preds_missing.csv"], "give one image set"),
    "predictions naming another image": (["a"], ["--predictions", "preds_extra.csv"],
                                         "is not one of the audited images"),
    "predictions missing an image": (["a"], ["--predictions", "preds_missing.csv"], "no row in"),
    "predictions listing an image twice": (["a"], ["--predictions", "preds_twice.csv"], "listed twice"),
    "predictions without a prediction column": (["a"], ["--predictions", "preds_columns.csv"],
                                                "missing: prediction"),
    "predictions with no rows": (["a"], ["--predictions", "preds_header_only.csv"], "has no rows"),
    "predictions without errors": (["a"], ["--predictions", "preds_all_right.csv"], "errors has 0 image(s)"),
    "no predictions file": (["a"], ["--predictions", "none.csv"], "no such predictions file"),
    "an encoder folder that is no CLIP": (AB, ["--encoder", "not_a_clip"], "open_clip_config.json is missing"),
    "an encoder that does not exist": (AB, ["--encoder", "nowhere"], "give biomedclip, a folder"),
    "BiomedCLIP not installed": (AB, ["--encoder", "biomedclip"], "cannot be downloaded here"),
    "--top -1": (AB, ["--top", "-1"], "--top must be from 0"),
    "--examples 0": (AB, ["--examples", "0"], "--examples must be from 1"),
    "--permutations 5": (AB, ["--permutations", "5"], "--permutations must be from 99"),
    "the same name twice": (AB, ["--names", "x x"], "both sets the name"),
    "report folder is a file": (AB, ["-o", "report_file"], "is a file"),
    "report folder not empty": (AB, ["-o", "kept"], "already exists and is not empty"),
}


def audit_args(clip: Path, sets: list[str], changes: list[str]) -> list[str]:
    defaults = {"--concepts": "concepts.txt", "--encoder": str(clip), "-o": "report", "--permutations": "99"}
    verb, *options = verb_args("audit", defaults, changes)
    options = [part for option in options for part in option.split(" ")]  # "x x": --names takes two values
    return [verb, *sets, *options]


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_and_nothing_written(case, own_clip, workdir, monkeypatch, tmp_path):
    monkeypatch.setenv("MEDDIFF_WEIGHTS", str(tmp_path / "no-weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    sets, changes, fragment = CASES[case]
    write_inputs(workdir)
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*audit_args(own_clip, sets, changes)), fragment)
    before.assert_unchanged()


def test_the_same_inputs_audit_cleanly(own_clip, workdir):
    write_inputs(workdir)
    result = run_meddiff(*audit_args(own_clip, AB, []))
    assert result.code == 0, result.err
    assert {p.name for p in (workdir / "report").iterdir()} >= {"audit.json", "audit.html", "scores.csv"}
    (workdir / "ab").mkdir()
    for name in ("a", "b"):
        for k in range(3):
            (workdir / "ab" / f"{name}{k}.nii.gz").symlink_to(workdir / name / f"{k}.nii.gz")
    (workdir / "preds.csv").write_text("image,label,prediction\n" + "".join(
        f"ab/{n}{k}.nii.gz,1,{int(k > 0)}\n" for n in "ab" for k in range(3)))  # wrong on a0 and b0
    result = run_meddiff("audit", "ab", "--predictions", "preds.csv", "--concepts", "concepts.txt", "--encoder",
                         str(own_clip), "-o", "model_report", "--permutations", "99")
    assert result.code == 0, result.err
    assert '"errors": 2' in (workdir / "model_report" / "audit.json").read_text()
