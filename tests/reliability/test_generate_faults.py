"""``meddiff generate`` under bad arguments, foreign files, kills, Ctrl-C and a second run into the same folder.

The promises: every argument is checked before the output folder exists (a refused run leaves
nothing); a file the folder's own records do not claim is never replaced; one run at a time writes
into a folder; SIGKILL or SIGTERM mid-run, then the same command again, gives the very bytes of an
uninterrupted run with no temporary left; Ctrl-C and SIGTERM end with exit 130 and one line,
keeping (and recording) the finished images.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import Result, Snapshot, assert_clean_error, run_meddiff, tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]
N, STEPS = 6, 20  # enough work after the first image that a kill lands mid-run
RUN = ["-n", str(N), "--steps", str(STEPS), "--batch-size", "1"]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny model, a class-conditioned one, and two whose configs ask for impossible shapes."""
    root = tmp_path_factory.mktemp("gen_models")
    found = {"plain": tiny_model, "classes": tiny_model_dir(root / "classes", num_class_embeds=3)}
    for name, shape in (("huge", [2**20, 2**20]), ("odd", [15, 15])):
        folder = shutil.copytree(tiny_model, root / name)
        config = json.loads((folder / "config.json").read_text())
        config["image"]["shape"] = shape
        (folder / "config.json").write_text(json.dumps(config))
        found[name] = folder
    return found


# case: (model, extra arguments, fragment of the error line)
BAD_ARGUMENTS = {
    "--devices abc": ("plain", ["--devices", "abc"], "--devices"),
    "--devices 0": ("plain", ["--devices", "0"], "--devices 0"),
    "--accelerator abacus": ("plain", ["--accelerator", "abacus"], "--accelerator abacus"),
    "--seed 10**23": ("plain", ["--seed", str(10**23)], "--seed"),
    "--seed -1": ("plain", ["--seed", "-1"], "--seed"),
    "--seed at the top of the range": ("plain", ["--seed", str(2**64 - 1)], "--seed"),  # seed + 1 runs past 2**64 - 1
    "-n 10**12": ("plain", ["-n", str(10**12)], "split the set"),
    "-n 0": ("plain", ["-n", "0"], "-n"),
    "--batch-size 0": ("plain", ["--batch-size", "0"], "--batch-size"),
    "--steps 0": ("plain", ["--steps", "0"], "--steps"),
    "--steps beyond training": ("plain", ["--steps", "5000"], "--steps"),
    "unknown scheduler": ("plain", ["--scheduler", "magic"], "unknown scheduler"),
    "missing model": ("missing", [], "no model"),
    "huge model shape": ("huge", [], "GiB"),
    "shape the UNet cannot halve": ("odd", [], "multiple of 2"),
    "--class-label without classes": ("plain", ["--class-label", "1"], "no classes"),
    "--class-label out of range": ("classes", ["--class-label", "3"], "out of range"),
    "--class-label -1": ("classes", ["--class-label", "-1"], "out of range"),
    "--class-label 10**30": ("classes", ["--class-label", str(10**30)], "class label"),
    "class model without --class-label": ("classes", [], "--class-label"),
    "--guidance-scale nan": ("plain", ["--guidance-scale", "nan"], "--guidance-scale"),
    "--guidance-scale -1": ("plain", ["--guidance-scale", "-1"], "--guidance-scale"),
    "--guidance-scale inf": ("plain", ["--guidance-scale", "inf"], "--guidance-scale"),
    "--guidance-scale without a text encoder": ("plain", ["--guidance-scale", "3"], "no text encoder"),
    "--negative-prompt without a text encoder": ("plain", ["--negative-prompt", "effusion"], "no text encoder"),
    "--prompt without a text encoder": ("plain", ["--prompt", "no acute findings"], "no prompts"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_the_output_folder_exists(case, models, workdir):
    model, extra, fragment = BAD_ARGUMENTS[case]
    before = Snapshot(workdir)
    argv = ["generate", "--model", models.get(model, workdir / "no_such_model"), "-o", "runs/out", "-n", "2",
            "--steps", "2", *extra]
    assert_clean_error(run_meddiff(*argv), fragment)
    before.assert_unchanged()  # not even an empty runs/out


def test_a_users_file_beside_a_meddiff_manifest_is_never_replaced(tiny_model, workdir):
    out = workdir / "out"
    args = ["generate", "--model", tiny_model, "-o", out, "--steps", "2"]
    assert run_meddiff(*args, "-n", "1").code == 0
    (out / "sample_000001.nii.gz").write_bytes(b"the user's own scan")  # not in the folder's manifest
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff(*args, "-n", "3"), "sample_000001.nii.gz", "not recorded")
    before.assert_unchanged()


def test_a_second_run_into_a_locked_folder_is_refused_at_once(tiny_model, workdir):
    from meddiff.files import folder_lock

    out = workdir / "out"
    out.mkdir()
    with folder_lock(out, "test run"):
        before = Snapshot(workdir)
        assert_clean_error(
            run_meddiff("generate", "--model", tiny_model, "-o", out, "-n", "1", "--steps", "2"), "in use", str(out)
        )
        before.assert_unchanged()
    assert not list(out.iterdir())  # the lock file goes with the lock


def test_ctrl_c_exits_130_and_keeps_the_finished_images_recorded(tiny_model, workdir, monkeypatch):
    from meddiff.data.manifest import Manifest
    from meddiff.training import predict

    calls = []
    original = predict.sample

    def sample_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C, delivered while the third image is made
        return original(*args, **kwargs)

    monkeypatch.setattr(predict, "sample", sample_then_ctrl_c)
    out = workdir / "out"
    result = run_meddiff("generate", "--model", tiny_model, "-o", out, "-n", "5", "--steps", "2", "--batch-size", "1")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning set it to SIG_IGN; put back
    assert_clean_error(result, "interrupted", code=130)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "sample_000000.nii.gz", "sample_000001.nii.gz"]
    assert [r.provenance["index"] for r in Manifest.read(out / "manifest.jsonl").records] == [0, 1]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> dict[str, bytes]:
    """Every entry of an uninterrupted run's folder, by name."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_meddiff("generate", "--model", tiny_model, "-o", out, *RUN).code == 0
    return folder_bytes(out)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    # hidden entries too: a temporary or lock would show
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def start(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    argv = [sys.executable, "-m", "meddiff.cli.main", "generate", "--model", str(model), "-o", str(out), *RUN, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)


def wait_for_first_image(proc: subprocess.Popen, out: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "sample_000000.nii.gz").exists():
        assert proc.poll() is None, f"generate ended before its first image: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no image appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_killed_mid_run_then_rerun_gives_the_uninterrupted_bytes(how, tiny_model, reference, workdir):
    out = workdir / "out"
    proc = start(tiny_model, out)
    wait_for_first_image(proc, out)
    proc.send_signal(getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=120)
    made = sorted(p.name for p in out.glob("sample_*"))
    assert 0 < len(made) < N, "the kill did not land mid-run"
    if how == "SIGTERM":  # as Ctrl-C: one line, exit 130, the finished images recorded, nothing partial or hidden left
        assert_clean_error(Result(proc.returncode, stdout, stderr), "interrupted", code=130)
        assert sorted(folder_bytes(out)) == ["manifest.jsonl", *made]
        assert all(folder_bytes(out)[name] == reference[name] for name in made)
    else:  # what a kill mid-write leaves, made certain: a temporary of meddiff's naming
        assert proc.returncode == -signal.SIGKILL
        (out / ".sample_000005.nii.gz.meddiff-tmp-k1ll3d00.nii.gz").write_bytes(b"half an image")
    assert run_meddiff("generate", "--model", tiny_model, "-o", out, *RUN).code == 0
    assert folder_bytes(out) == reference  # every image and the manifest, byte for byte; no temporary, no lock file


def test_two_runs_started_together_into_one_folder_lose_nothing(tiny_model, workdir):
    from meddiff.data.manifest import Manifest

    out = workdir / "out"
    runs = [start(tiny_model, out, "--seed", seed) for seed in ("0", "1000")]
    results = [Result(p.wait(timeout=600), *p.communicate()) for p in runs]
    assert sorted(r.code for r in results) == [0, 2], [r.err[-1000:] for r in results]
    _, loser = sorted(results, key=lambda r: r.code)
    assert_clean_error(loser, str(out))  # "in use by another run", or "holds images of another run" if it came second
    records = Manifest.read(out / "manifest.jsonl").records
    first = records[0].provenance["seed"]
    assert [r.provenance["seed"] for r in records] == list(range(first, first + N))  # the winner's whole set
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", *(f"sample_{i:06d}.nii.gz" for i in range(N))]


@pytest.mark.parametrize(
    ("name", "temporary"),
    [
        (".sample_000001.nii.gz.meddiff-tmp-a1b2c3d4.nii.gz", True),
        (".manifest.jsonl.meddiff-tmp-zz_99xyz.jsonl", True),
        (".sample_000002.partial", True),
        ("sample_000001.nii.gz", False),
        (".hidden_notes.txt", False),
        (".meddiff.lock", False),
        ("sample.meddiff-tmp-a1b2c3d4.nii.gz", False),  # not hidden: a user's name, however odd
    ],
)
def test_temporary_names_are_a_convention_scans_can_rely_on(name, temporary, tmp_path):
    from meddiff.files import atomic_path, is_temporary

    assert is_temporary(tmp_path / name) is temporary
    with atomic_path(tmp_path / "scan.nii.gz") as tmp:
        assert is_temporary(tmp) and tmp.name.startswith(".scan.nii.gz.") and tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"x")
