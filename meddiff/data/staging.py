"""All-or-nothing writes of a set of files (images plus manifest): a hidden staging folder renamed into place.

``atomic_path`` makes one file appear whole or not at all; a sample set is many files, and a refusal,
an error or Ctrl-C/SIGTERM halfway must not leave half a set. The set is written into a hidden folder
beside the output (``.NAME.staging-HOST~PID-XXXX``, ignored by every meddiff folder scan), which
becomes the output by one rename when complete. The standard library has no such helper
(``tempfile`` makes the folder, ``os.replace`` commits it), so this small one is written here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import UMASK


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False,
                  last: tuple[str, ...] = ("manifest.jsonl",)) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out_dir``; on success its files become ``out_dir``'s, on any
    error it vanishes.

    A new ``out_dir`` is the staging folder renamed: the whole set appears at once. An existing
    ``out_dir`` must be empty unless ``overwrite``; it is kept (a shell inside it, its permissions, a
    mount point) and the complete set is moved into it file by file, the ``last`` names (the
    manifest) last, so nothing in it changes until every file is written; its other files are kept.
    """
    from meddiff.outputs import output_lock

    shown, out_dir = out_dir, Path(out_dir).resolve()  # resolved: '-o .' has a name and a parent to stage beside
    made = [a for a in out_dir.parents if not a.exists()]  # folders this call creates, removed again on failure
    with output_lock(out_dir):  # one writer per set: a second run is refused at once
        yield from _staged(shown, out_dir, overwrite, last, made)


def check_set_folder(out_dir: str | os.PathLike, overwrite: bool = False, shown=None) -> None:
    """``out_dir`` can take a set: not a file, and new or empty unless ``overwrite``. ``staged_folder`` checks it
    again when it starts; a command whose work comes first checks it before that work."""
    shown, out_dir = shown or out_dir, Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MeddiffError(f"{shown} is a file — give a folder for the set")
    if _non_empty(out_dir) and not overwrite:
        raise MeddiffError(f"{shown} already exists and is not empty — choose a new folder or pass --overwrite "
                           "(overwrite=True from Python)")


def _staged(shown, out_dir: Path, overwrite: bool, last: tuple[str, ...], made: list[Path]) -> Iterator[Path]:
    remove_stale(out_dir)
    check_set_folder(out_dir, overwrite, shown)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{_owner()}-", dir=out_dir.parent))
    committed = False
    try:
        yield stage
        if not out_dir.exists():
            os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700; the set gets a usual folder's mode
            os.replace(stage, out_dir)
        else:
            if _non_empty(out_dir) and not overwrite:
                raise MeddiffError(f"{shown} was filled by something else while the set was written "
                                   "— choose a new folder or pass --overwrite (overwrite=True from Python)")
            for entry in sorted(stage.iterdir(), key=lambda e: e.name in last):  # renames only: no writing left to fail
                os.replace(entry, out_dir / entry.name)
        committed = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not committed:
            for folder in made:  # innermost first; one that something else filled meanwhile stays
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _owner() -> str:
    """``host~pid`` of this process, in the staging folder's name, so a later run can tell a dead writer's leftovers."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    return f"{host}~{os.getpid()}"


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove staging folders beside ``out_dir`` left by a killed writer (SIGKILL, power loss) on this host.

    A folder is stale when its writer's process no longer exists; folders of other hosts (a shared
    file system) and of live processes are left alone.
    """
    removed, host, prefix = [], _owner().split("~")[0], f".{out_dir.name}.staging-"
    for folder in out_dir.parent.glob(f"{glob_escape(prefix)}*~*-*"):
        owner = folder.name[len(prefix) :].rpartition("-")[0]
        owner_host, _, pid = owner.rpartition("~")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _non_empty(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())
