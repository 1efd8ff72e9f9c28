"""All-or-nothing writes of a set of files (images plus manifest): a hidden staging folder renamed into place.

``atomic_path`` makes one file appear whole or not at all; a sample set is many files, and a refusal,
an error or Ctrl-C/SIGTERM halfway must not leave half a set. The set is written into a hidden folder
beside the output (``.NAME.staging-XXXX``, ignored by every meddiff folder scan), which becomes the
output by one rename when complete. The standard library has no such helper (``tempfile`` makes the
folder, ``os.rename`` commits it), so this small one is written here.
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
def staged_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out_dir``; on success it becomes ``out_dir``, on any error it vanishes.

    ``out_dir`` must not exist, or be empty, unless ``overwrite``: then the set's files replace
    those of the same name, the folder's other files are kept (hard links, so nothing is copied), and
    the old folder is swapped out by rename and removed only once the new one is in place.
    """
    shown, out_dir = out_dir, Path(out_dir).resolve()  # resolved: '-o .' has a name and a parent to stage beside
    remove_stale(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MeddiffError(f"{shown} is a file — give a folder for the set")
    if _non_empty(out_dir) and not overwrite:
        raise MeddiffError(f"{shown} already exists and is not empty — choose a new folder or pass --overwrite")
    made = [a for a in out_dir.parents if not a.exists()]  # folders this call creates, removed again on failure
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-{_owner()}-", dir=out_dir.parent))
    old, committed = None, False
    try:
        yield stage
        os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700; the set gets a usual folder's mode
        if _non_empty(out_dir):
            if not overwrite:
                raise MeddiffError(f"{shown} was filled by something else while the set was written — choose a new folder or pass --overwrite")
            for entry in out_dir.iterdir():  # the folder's other files come along
                if not (stage / entry.name).exists():
                    _link(entry, stage / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-{_owner()}-", dir=out_dir.parent))
            os.replace(out_dir, old)  # the old set stays whole at `old` until...
        try:
            os.replace(stage, out_dir)  # ...the new one is in place (rename onto a missing or empty folder)
        except OSError as exc:
            raise MeddiffError(f"{shown} changed while the set was written ({exc.strerror}) — run the command again") from None
        committed = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            if committed:
                shutil.rmtree(old, ignore_errors=True)
            elif not out_dir.exists():
                os.replace(old, out_dir)  # interrupted between the two renames: the old set goes back
            else:
                with contextlib.suppress(OSError):
                    old.rmdir()  # interrupted before the swap: only the empty placeholder to remove
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
    file system) and of live processes are left alone. An ``old`` folder whose swap was cut short
    goes back into place when ``out_dir`` is missing.
    """
    removed, host = [], _owner().split("~")[0]
    for kind in ("staging", "old"):
        for folder in out_dir.parent.glob(f".{glob_escape(out_dir.name)}.{kind}-*~*-*"):
            owner, _, _ = folder.name[len(f".{out_dir.name}.{kind}-"):].rpartition("-")
            owner_host, _, pid = owner.rpartition("~")
            if owner_host != host or not pid.isdigit() or _alive(int(pid)) or not folder.is_dir():
                continue
            if kind == "old" and not out_dir.exists():
                os.replace(folder, out_dir)
            else:
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


def _link(source: Path, target: Path) -> None:
    """Hard-link a file (or a folder's files) into the staging folder; copy where links are not possible."""

    def link_or_copy(src, dst):
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)

    if source.is_dir() and not source.is_symlink():
        shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(source, target)
