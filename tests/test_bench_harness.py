"""The bench harness: every script runs as ``python -m bench.NAME`` on the one runner of ``bench/harness.py``
(its options, its timing, its JSON record), and the scripts import each other one way (``from bench.x import y``)."""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py") if p.stem not in {"__init__", "harness"})
LAYOUT = {"benchmark", "command", "machine", "arguments", "results"}

# Runs each script's ``--help`` the way ``python -m`` runs a module (runpy), all in one process: importing torch,
# MONAI and Lightning once instead of once per script keeps this test fast on two cores.
HELP_LOOP = """
import contextlib, io, json, runpy, sys
outcome = {}
for name in sys.argv[1:]:
    sys.argv = [name, "--help"]
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
        code = "returned without exiting"
    except SystemExit as stop:
        code = stop.code
    except BaseException as error:  # an import that fails, say
        code = repr(error)
    outcome[name] = [code, text.getvalue()]
print("RESULT " + json.dumps(outcome))
"""


@pytest.fixture
def harness(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.harness")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_there_are_scripts():
    assert len(SCRIPTS) > 20 and "sampling_speed" in SCRIPTS


def test_every_script_answers_help_as_a_module():
    proc = subprocess.run([sys.executable, "-c", HELP_LOOP, *SCRIPTS], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    failed = {name: code for name, (code, _) in outcome.items() if code not in (0, None)}
    assert not failed, failed
    for name, (_, text) in outcome.items():
        assert text.startswith(f"usage: python -m bench.{name}"), (name, text[:200])
        assert "--out PATH" in text, name


def test_python_dash_m_runs_a_script():
    """One real ``python -m bench.NAME`` (the lightest script), from the repository root as documented."""
    env = {k: v for k, v in _env().items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "bench.reliability", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m bench.reliability")


def _calls(tree: ast.AST, name: str) -> list[int]:
    """Lines that call ``name(...)`` or ``something.name(...)``."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call) and (
        (isinstance(node.func, ast.Attribute) and node.func.attr == name)
        or (isinstance(node.func, ast.Name) and node.func.id == name))]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_uses_the_harness(name):
    tree = ast.parse((BENCH / f"{name}.py").read_text())
    # options are parsed by the harness only
    assert not _calls(tree, "ArgumentParser"), f"{name}: builds its own ArgumentParser"
    assert not _calls(tree, "parse_args") and not _calls(tree, "parse_known_args"), f"{name}: parses arguments"
    assert _calls(tree, "parser"), f"{name}: no harness.parser(...)"
    # one way of importing each other: ``from bench.x import y``, no path tricks
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", None) == "sys":
            pytest.fail(f"{name}:{node.lineno}: sys.path")
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{name}:{node.lineno}: relative import"
            assert (node.module or "").split(".")[0] not in SCRIPTS, f"{name}:{node.lineno}: import without bench."
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] not in SCRIPTS, f"{name}:{node.lineno}: import without bench."
    # the entry point is one line
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert {"options", "run"} <= functions, name
    guards = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(guards) == 1 and [ast.unparse(s) for s in guards[0].body] == ["harness.main(run, options)"], name


def test_only_the_harness_builds_parsers():
    everything = {p.name: _calls(ast.parse(p.read_text()), "ArgumentParser") for p in BENCH.glob("*.py")}
    assert [name for name, lines in everything.items() if lines] == ["harness.py"]


def test_commands_are_python_dash_m():
    for path in [*BENCH.glob("*.py"), *BENCH.glob("*.sh")]:
        text = path.read_text()
        assert "python bench/" not in text and "PYTHONPATH=." not in text and "cd bench" not in text, path.name


def test_write_result_layout(harness, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(BENCH / "frechet_speed.py"), "--n", "10", "--out", "a b.json"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(harness, "_COMMAND", None)
    args = argparse.Namespace(n=10, out=Path("a b.json"), levels=(1.0, 3.0))
    out = tmp_path / "new folder" / "frechet_speed.json"
    results = {"median_s": np.float64(0.25), "rows": [{"value": np.float32(1.5)}], "shape": np.array([2, 3])}
    assert harness.write_result("frechet_speed", args, results, out) == out
    written = json.loads(out.read_text())
    assert set(written) == LAYOUT
    assert written["benchmark"] == "frechet_speed"
    assert written["command"] == "OMP_NUM_THREADS=1 python -m bench.frechet_speed --n 10 --out 'a b.json'"
    assert written["arguments"] == {"n": 10, "out": "a b.json", "levels": [1.0, 3.0]}
    assert written["results"] == {"median_s": 0.25, "rows": [{"value": 1.5}], "shape": [2, 3]}
    machine = written["machine"]
    assert {"cpu", "cpu_cores", "torch_threads", "torch", "meddiff", "gpu"} <= set(machine)
    assert machine["cpu_cores"] >= 1 and machine["torch_threads"] >= 1 and machine["meddiff"]
    host = socket.gethostname()
    if len(host) >= 4:
        assert host not in out.read_text()  # nothing that names the machine
    assert sorted(p.name for p in out.parent.iterdir()) == ["frechet_speed.json"]  # no temporary left
    assert harness.read_result(out) == written["results"]
    # a rerun replaces the record; a record that cannot be written leaves the old one and no temporary
    harness.write_result("frechet_speed", args, {"again": True}, out)
    assert harness.read_result(out) == {"again": True}
    with pytest.raises(TypeError):
        harness.write_result("frechet_speed", args, {"bad": object()}, out)
    assert harness.read_result(out) == {"again": True}
    assert sorted(p.name for p in out.parent.iterdir()) == ["frechet_speed.json"]


def test_read_result_of_an_older_record(harness, tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"sampling": {"ddim-50": 1.0}}))
    assert harness.read_result(path) == {"sampling": {"ddim-50": 1.0}}


def test_parser_conventions(harness):
    parser = harness.parser("what it does", out=harness.REQUIRED, device="cpu", seed=0, repeats=5)
    args = parser.parse_args(["--out", "x.json"])
    assert vars(args) == {"out": Path("x.json"), "device": "cpu", "seed": 0, "repeats": 5}
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert harness.parser(None, out=harness.results_file("demo")).parse_args([]).out == Path("bench/results/demo.json")
    assert harness.parser(None, out=None).parse_args([]).out is None
    older = harness.parser(None, out=None, out_aliases=("--json",))
    assert older.parse_args(["--json", "t.json"]).out == Path("t.json")
    assert not {"device", "seed", "repeats"} & set(vars(harness.parser(None, out=".gpu").parse_args([])))


def test_timing(harness):
    calls = []
    timing = harness.timed(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing["runs"]) == 3
    assert 0 <= timing["min"] <= timing["median"] and set(timing) == {"median", "min", "runs"}
    runs: list[float] = []
    with harness.stopwatch(runs) as lap:
        sum(range(1000))
    assert runs == [lap.seconds] and lap.seconds >= 0 and lap.cpu_seconds >= 0
    assert harness.device_sync("cpu") is None
    with pytest.raises(ValueError):
        harness.timed(lambda: None, repeats=0)


def test_main_parses_and_exits_with_the_status_of_run(harness, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x.py", "--seed", "7"])
    monkeypatch.setattr(harness, "_COMMAND", None)  # main() records the command line of this process
    seen = []

    def run(args):
        seen.append(args.seed)
        return 3

    with pytest.raises(SystemExit) as stop:
        harness.main(run, lambda: harness.parser(None, out=None, seed=0))
    assert stop.value.code == 3 and seen == [7]


def test_module_command_and_env(harness):
    assert harness.module_command("latent_3d", "--one", "pixel", "64") == [
        sys.executable, "-m", "bench.latent_3d", "--one", "pixel", "64"]
    env = harness.module_env(OMP_NUM_THREADS="1")
    assert env["OMP_NUM_THREADS"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)
