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
import tempfile
from collections.abc import Iterator
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
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MeddiffError(f"{out_dir} is a file — give a folder for the set")
    if _non_empty(out_dir) and not overwrite:
        raise MeddiffError(f"{out_dir} already exists and is not empty — choose a new folder or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    old, committed = None, False
    try:
        yield stage
        os.chmod(stage, 0o777 & ~UMASK)  # mkdtemp makes 0700; the set gets a usual folder's mode
        if _non_empty(out_dir):
            for entry in out_dir.iterdir():  # the folder's other files come along
                if not (stage / entry.name).exists():
                    _link(entry, stage / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old)  # the old set stays whole at `old` until...
        try:
            os.replace(stage, out_dir)  # ...the new one is in place (rename onto a missing or empty folder)
        except OSError as exc:
            raise MeddiffError(f"{out_dir} changed while the set was written ({exc.strerror}) — run the command again") from None
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
