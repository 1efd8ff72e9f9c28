"""What a verb may write: never an input, one writer per output, and only files meddiff itself wrote replaced.

Three promises a clinical user relies on, kept here once for every writer (RELIABILITY.md, "Outputs"):

- **Inputs are sacred** (``check_not_source``): an output that is an input or a template, lies inside one, or
  contains one (real paths, symlinks resolved) is refused before any work. A DICOM output is also refused inside
  the folder of a DICOM input file that holds other DICOM files, where it would make that folder hold two series.
- **One writer per output** (``output_lock``): a lock beside the output (``.NAME.meddiff-lock``), taken before the
  work and held until the output is in place; a second run is refused at once with a line naming the output.
- **Never delete what meddiff did not write** (``commit_series``): every DICOM series folder meddiff writes records
  its files and SeriesInstanceUID in a hidden ``.meddiff-series.json``. ``--overwrite`` replaces only the files that
  record names; a folder holding anything else is refused, naming the foreign files. After the files are moved in,
  the folder is checked to hold exactly the series written (file count and SeriesInstanceUID).

The standard library and ``filelock`` give the pieces (``os.replace``, ``os.path.realpath``, ``FileLock``); the
ownership record is meddiff's own convention, so it is written here.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import TEMP_MARK, UMASK, atomic_path, exclusive, is_temporary

SERIES_RECORD = ".meddiff-series.json"  # in every series folder meddiff writes: its files and SeriesInstanceUID
LOCK_SUFFIX = ".meddiff-lock"  # beside an output: .NAME.meddiff-lock
_HELD: dict[str, int] = {}  # lock files this process holds, so a writer inside a verb's lock does not lock again


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(path))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_not_source(output: str | os.PathLike, sources: Mapping[str, str | os.PathLike | None],
                     dicom: bool = False) -> None:
    """Refuse ``output`` when it is, lies inside or contains one of ``sources`` (``{"the input": path, ...}``).

    With ``dicom`` (the output is a DICOM file or series) the folder of a DICOM source file counts too when it
    holds other DICOM files: a second series there would make that series folder ambiguous for the next run.
    """
    from meddiff.io import is_dicom_path

    out = _real(output)
    for role, source in sources.items():
        if not source or not Path(source).exists():
            continue
        src = _real(source)
        if out == src:
            raise MeddiffError(f"the output {output} is {role} — write the result elsewhere; "
                               "meddiff never replaces what it reads")
        if src.is_dir() and _within(out, src):
            raise MeddiffError(f"the output {output} lies inside {role} {source} — write it outside that folder, "
                               "which must keep only what it holds now")
        if _within(src, out):
            raise MeddiffError(f"the output {output} contains {role} {source} — choose an output that holds "
                               "none of the inputs")
        if dicom and src.is_file() and is_dicom_path(src) and _within(out, src.parent) and _holds_dicom(src):
            raise MeddiffError(f"the DICOM output {output} lies in the series folder of {role} {source}: that folder "
                               "would hold two series — write it to another folder")


def _holds_dicom(source: Path) -> bool:
    """Whether the folder of the DICOM file ``source`` holds other DICOM files: a series folder."""
    from meddiff.io.dicom import is_dicom_file

    return any(entry != source and entry.is_file() and is_dicom_file(entry) for entry in source.parent.iterdir())


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of one output (``.NAME.meddiff-lock`` beside it) for the block, or refuse at once.

    Re-entrant within a process: a writer called inside a verb that already holds the lock goes on. A killed
    holder leaves the file but not the lock (the kernel drops flock locks with the process). Folders made to hold
    the lock are removed again when they are still empty at the end.
    """
    path = _real(output)
    lock_file = path.parent / f".{path.name}{LOCK_SUFFIX}"
    key = str(lock_file)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    made = [folder for folder in path.parents if not folder.exists()]  # removed again if still empty at the end
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive(lock_file, f"{output} is being written by another meddiff run — wait for it to finish, "
                                  "or choose another output"):
            _HELD[key] = 1
            try:
                yield
            finally:
                del _HELD[key]
    finally:
        for folder in made:  # innermost first: a refused or failed run leaves no new empty folders
            with contextlib.suppress(OSError):
                folder.rmdir()


def series_record(folder: str | os.PathLike) -> dict:
    """The series record of a folder meddiff wrote (``files``, ``series_uid``); ``{"files": []}`` otherwise."""
    path = Path(folder) / SERIES_RECORD
    if not path.is_file():
        return {"files": []}
    try:
        record = json.loads(path.read_text())
        files = [str(name) for name in record["files"]]
    except (ValueError, KeyError, TypeError):
        raise MeddiffError(f"{path} is not a meddiff series record — remove the folder's contents yourself "
                           "or choose another output") from None
    return {**record, "files": files}


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that meddiff did not write there: not in its series record, not its own temporaries."""
    if not folder.is_dir():
        return []
    own = set(series_record(folder)["files"]) | {SERIES_RECORD}

    def ours(entry: Path) -> bool:
        return is_temporary(entry) or (entry.name in own and entry.is_file() and not entry.is_symlink())

    return sorted(entry.name for entry in folder.iterdir() if not ours(entry))


def check_series_output(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse, before any work, a series output that exists without ``--overwrite``, that is a file, or that
    holds files meddiff did not write; returns the path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MeddiffError(f"{out} is a file — a DICOM series is written as a folder: give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MeddiffError(f"{out} already exists — choose another output or pass --overwrite "
                               "(overwrite=True from Python)")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise MeddiffError(f"{out} holds files meddiff did not write ({shown}) — --overwrite replaces only "
                               "meddiff's own series: move those files, or choose another output")
    return out


@contextlib.contextmanager
def staged_series(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh hidden staging folder for a series; on success its files become ``out``'s (``commit_series``).

    Under ``out``'s lock: staging folders a killed run left for this output are removed first, and each run
    stages under its own unique name (``.NAME.meddiff-tmp-XXXXXXXX.partial``).
    """
    out = Path(out)
    with output_lock(out):
        check_series_output(out, overwrite)
        for stale in out.parent.glob(f".{glob.escape(out.name)}{TEMP_MARK}*"):  # ours alone: we hold the lock
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}", suffix=".partial", dir=out.parent))
        try:
            yield stage
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def commit_series(stage: Path, out: Path, series_uid: str, overwrite: bool) -> Path:
    """Move the series in ``stage`` into ``out`` (call inside ``staged_series``), then check the result.

    A new ``out`` is the staging folder renamed. An existing one (empty, or holding only meddiff's earlier
    series, checked again now) keeps its own folder: the record first names the old and new files, the new
    files are moved in, the old ones removed, and the record rewritten to the new files, so a run killed at any
    point leaves a folder whose record still covers every file in it.
    """
    files = sorted(entry.name for entry in stage.iterdir())
    record = {"series_uid": series_uid, "files": files, "writer": "meddiff"}
    if not out.exists():
        _write_record(stage, record)
        os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700; a series gets a usual folder's mode
        os.replace(stage, out)
    else:
        check_series_output(out, overwrite)
        old = [name for name in series_record(out)["files"] if (out / name).exists()]
        _write_record(out, {**record, "files": sorted(set(old) | set(files))})
        for name in files:
            os.replace(stage / name, out / name)
        for name in set(old) - set(files):
            (out / name).unlink()
        _write_record(out, record)
    verify_series(out, series_uid, files)
    return out


def _write_record(folder: Path, record: dict) -> None:
    with atomic_path(folder / SERIES_RECORD, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def verify_series(out: Path, series_uid: str, files: list[str]) -> None:
    """Refuse to report success unless ``out`` holds exactly ``files``, each of series ``series_uid``."""
    import pydicom

    present = sorted(entry.name for entry in out.iterdir() if not entry.name.startswith("."))
    if present != sorted(files):
        raise MeddiffError(f"{out} does not hold the series just written ({len(present)} files instead of "
                           f"{len(files)}): something else wrote into it — check the folder and write again")
    for name in files:
        uid = pydicom.dcmread(out / name, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
            "SeriesInstanceUID")
        if str(uid) != series_uid:
            raise MeddiffError(f"{out / name} belongs to another series ({uid}) than the one just written — "
                               "something else wrote into the folder: check it and write again")


@contextlib.contextmanager
def locked_atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``atomic_path`` under the output's lock: two runs never interleave on one file output."""
    with output_lock(path), atomic_path(path, overwrite) as tmp:
        yield tmp


def check_free_space(folder: str | os.PathLike, needed: int, what: str, fewer: str) -> None:
    """Refuse, before any work, ``what`` (plural: "200 radiographs"; ``needed`` bytes) when the disk that will hold
    ``folder`` (its nearest existing folder) has less free; ``fewer`` says how to ask for less."""
    folder = Path(folder)
    where = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    if needed > free:
        raise MeddiffError(f"{what} need about {size(needed)}, but {where} has {size(free)} free "
                           f"— free space there, choose another -o, or {fewer}")


def size(n: float) -> str:
    """``n`` bytes as a person reads them: 1.2 MB, 340 kB, 2.0 GB (decimal units, as ``df -H``)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
