"""The one runner every script in ``bench/`` uses: options, timing, the machine, the JSON record.

A script is a module run from the repository root as ``python -m bench.NAME``. It builds its options on
``parser()`` in a function ``options()``, does its work in ``run(args)`` (an ``int`` it returns is the exit
status) and ends with one line::

    if __name__ == "__main__":
        harness.main(run, options)

Conventions, the same in every script:

- ``--out PATH``: where the script writes: its JSON record, or, for a script that writes several files (tables,
  panels, models, arrays), the folder they go to; each script's ``--help`` says which and keeps its default.
  ``--device``, ``--seed`` and ``--repeats`` where a script has them, with the same meaning everywhere.
- Times are ``time.perf_counter`` differences taken by ``stopwatch()`` (one timed block) or ``timed()``
  (repeats of one function); on a GPU both synchronise the device before and after (``device_sync``).
- Every JSON record has one layout, ``record()``: ``{"benchmark", "command", "machine", "arguments",
  "results"}``, the script's own numbers under ``"results"``; ``write_result()`` writes it whole or not at
  all (``meddiff.files.atomic_path``) and ``read_result()`` reads the numbers back (also from records
  written before this layout).
- Scripts import each other as ``from bench.NAME import thing``; a script that runs itself in another
  process runs ``module_command(NAME, ...)`` with ``module_env()``, so the child is ``python -m bench.NAME``
  whatever the working directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]  # the repository root: ``python -m bench.NAME`` runs from here
RESULTS = Path("bench") / "results"  # relative, like every default path of the scripts
# environment variables that change a benchmark's numbers: the recorded command line starts with them
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "MEDDIFF_FUZZ_EXAMPLES")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()  # ``parser(out=REQUIRED)``: the script has no default output
_COMMAND: str | None = None  # the command line, as main() found it before the script ran


def results_file(name: str) -> Path:
    """The default JSON record of a script that had no output option of its own: ``bench/results/NAME.json``."""
    return RESULTS / f"{name}.json"


def _invocation() -> list[str]:
    """``python -m bench.NAME`` for the running script; otherwise the program's bare name (no paths)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    if program.suffix == ".py" and program.resolve().parent == ROOT / "bench":
        return ["python", "-m", f"bench.{program.stem}"]
    return ["python", program.name]


def command() -> str:
    """The command line that ran this process, as a shell would take it again: the environment variables of
    ``ENVIRONMENT`` that are set, then ``python -m bench.NAME`` and the arguments."""
    env = [f"{key}={os.environ[key]}" for key in ENVIRONMENT if key in os.environ]
    return shlex.join([*env, *_invocation(), *sys.argv[1:]])


def parser(description: str | None, *, out: str | os.PathLike | None, out_help: str | None = None,
           out_aliases: Sequence[str] = (), device: str | None = None, seed: int | None = None,
           repeats: int | None = None) -> argparse.ArgumentParser:
    """The script's option parser with the shared conventions; the script adds its own options to it.

    ``out``: the default of ``--out`` (a ``Path``; ``None``: nothing written unless given; ``REQUIRED``: no
    default); ``out_aliases``: older names of the same option. ``device``, ``seed``, ``repeats``: add
    ``--device``, ``--seed``, ``--repeats`` with this default (``None``: the script has no such option).
    """
    result = argparse.ArgumentParser(prog=" ".join(_invocation()), description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = {"required": True} if out is REQUIRED else {"default": None if out is None else Path(out)}
    if out_help is None:
        out_help = "the JSON record" if out is REQUIRED or out is None else "the JSON record (default: %(default)s)"
    result.add_argument("--out", *out_aliases, dest="out", type=Path, metavar="PATH", help=out_help, **where)
    if device is not None:
        result.add_argument("--device", default=device, help="torch device: cpu, cuda, cuda:N (default: %(default)s)")
    if seed is not None:
        result.add_argument("--seed", type=int, default=seed, help="random seed (default: %(default)s)")
    if repeats is not None:
        result.add_argument("--repeats", type=int, default=repeats,
                            help="timed repeats; medians are reported (default: %(default)s)")
    return result


def main(run: Callable[[argparse.Namespace], int | None],
         options: Callable[[], argparse.ArgumentParser] | argparse.ArgumentParser) -> NoReturn:
    """Parse the command line with the script's ``options()`` and exit with what ``run(args)`` returns."""
    global _COMMAND
    _COMMAND = command()  # before the script changes its own environment
    built = options if isinstance(options, argparse.ArgumentParser) else options()
    raise SystemExit(run(built.parse_args()))



# --- the machine -----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    """What the numbers were measured on: CPU model and cores, memory, torch threads, versions, GPU names.
    Nothing that identifies the machine or a person (no host name, user, path or serial number)."""
    import torch

    import meddiff

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    info = {
        "cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable, "memory_gib": _memory_gib(),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "system": f"{platform.system()} {platform.machine()}", "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "meddiff": meddiff.__version__,
        "gpu": gpus[0] if gpus else None, "gpu_count": len(gpus),
    }
    with contextlib.suppress(ImportError):
        import monai

        info["monai"] = monai.__version__
    return info


# --- timing ----------------------------------------------------------------------------------------------------


def device_sync(device: str | None) -> Callable[[], None] | None:
    """What to call so that a timer sees the device's queued work finished (``None`` on the CPU)."""
    if device is not None and str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


@dataclass
class Lap:
    """One timed block: wall-clock seconds (``time.perf_counter``) and this process's CPU seconds."""

    seconds: float = math.nan
    cpu_seconds: float = math.nan


@contextlib.contextmanager
def stopwatch(runs: list[float] | None = None, sync: Callable[[], None] | None = None) -> Iterator[Lap]:
    """Time the block: ``with stopwatch() as lap: ...`` then ``lap.seconds``; also appended to ``runs``.
    ``sync`` (``device_sync(device)``) is called before the clock starts and before it stops."""
    lap = Lap()
    if sync is not None:
        sync()
    start, cpu = time.perf_counter(), time.process_time()
    yield lap
    if sync is not None:
        sync()
    lap.seconds, lap.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    if runs is not None:
        runs.append(lap.seconds)


def summary(runs: Sequence[float]) -> dict:
    """``{"median", "min", "runs"}`` of some timed runs (seconds)."""
    return {"median": statistics.median(runs), "min": min(runs), "runs": list(runs)}


def timed(function: Callable[[], object], repeats: int = 1, *, warmup: int = 0,
          sync: Callable[[], None] | None = None) -> dict:
    """Call ``function`` ``warmup`` times untimed, then ``repeats`` times timed: ``summary()`` of the runs.
    (Comparisons alternate their contenders within each repeat themselves, with ``stopwatch``.)"""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        function()
    runs: list[float] = []
    for _ in range(repeats):
        with stopwatch(runs, sync):
            function()
    return summary(runs)


# --- the JSON record -------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON for the values argparse and numpy hand over: paths as strings, numpy scalars and arrays as numbers."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    for method in ("item", "tolist"):  # numpy and torch scalars / arrays
        if hasattr(value, method) and callable(getattr(value, method)):
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                return getattr(value, method)()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def record(name: str, args: argparse.Namespace | dict | None, results: Any) -> dict:
    """The one layout of every record: benchmark name, command line, machine, arguments, the script's results."""
    arguments = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {"benchmark": name, "command": _COMMAND or command(), "machine": machine(),
            "arguments": json.loads(json.dumps(arguments, default=_plain)), "results": results}


def write_result(name: str, args: argparse.Namespace | dict | None, results: Any, out: str | os.PathLike) -> Path:
    """Write ``record(name, args, results)`` as JSON to ``out`` (its folder is created), whole or not at all;
    a record already there is replaced (rerunning a benchmark renews its record)."""
    from meddiff.files import atomic_path

    text = json.dumps(record(name, args, results), indent=2, default=_plain) + "\n"  # fails before any file exists
    with atomic_path(out, overwrite=True) as tmp:
        tmp.write_text(text)
    return Path(out)


def read_result(path: str | os.PathLike) -> Any:
    """The results of a record ``write_result`` wrote; a JSON file of the layout before it, whole."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and {"benchmark", "machine", "results"} <= data.keys():
        return data["results"]
    return data


# --- child processes -------------------------------------------------------------------------------------------


def module_command(name: str, *arguments: str) -> list[str]:
    """The argument list that runs ``python -m bench.NAME ARGUMENTS`` with this interpreter."""
    return [sys.executable, "-m", f"bench.{name}", *arguments]


def module_env(**overrides: str) -> dict[str, str]:
    """This process's environment with ``overrides`` and the repository root first on ``PYTHONPATH``, so a
    ``module_command`` child finds ``bench`` from any working directory."""
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, **overrides, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
