"""File helpers: write-then-rename, so a failed or interrupted write never leaves a half-written output; content hashes.

Naming convention for temporaries (every writer in meddiff keeps it; folder scans rely on it):

- every temporary meddiff makes lives beside its final output and its name starts with a dot, so
  scans that skip dot-files never read one;
- a file being written is ``.NAME.meddiff-tmp-XXXXXXXX.SUFFIX`` (``atomic_path``; SUFFIX repeats
  the output's, so writers pick the right format), a folder being written is ``.NAME.partial``;
- ``is_temporary(path)`` says whether a name is one of these, and ``remove_temporaries(folder)``
  clears the ones a killed process (SIGKILL, power loss) left behind: call it under the folder's
  lock (``folder_lock``) before resuming work in a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from meddiff.errors import MeddiffError

TEMP_MARK = ".meddiff-tmp-"  # inside every atomic_path temporary's name: .NAME.meddiff-tmp-XXXXXXXX.SUFFIX
PARTIAL_SUFFIX = ".partial"  # a folder being written: .NAME.partial
LOCK_NAME = ".meddiff.lock"  # a folder's lock file (folder_lock), removed when the lock is released
_TEMPORARY = re.compile(rf"^\..+(?:{re.escape(TEMP_MARK)}[A-Za-z0-9_]+.*|{re.escape(PARTIAL_SUFFIX)})$")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _current_umask()  # read once at import: changing the umask later would race other threads


def full_suffix(path: str | os.PathLike) -> str:
    """``.nii.gz`` for ``scan.nii.gz``; ``.png`` for ``a.b.png`` (only known double suffixes)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".tar.gz"):
        if name.endswith(double):
            return double
    return Path(path).suffix.lower()


def stem(path: str | os.PathLike) -> str:
    """File name without its (full) suffix: ``scan`` for ``scan.nii.gz``, ``IM0001`` for ``IM0001``."""
    name = Path(path).name
    suffix = full_suffix(path)
    return name[: -len(suffix)] if suffix else name


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace an existing output unless asked; create the parent folder."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MeddiffError(f"{path} already exists — choose another output or pass --overwrite "
                           "(overwrite=True from Python)")
    if path.is_dir():
        raise MeddiffError(f"{path} is a folder — give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix, so writers pick the same format).

    On success the temporary file replaces ``path``; on any error it is removed.
    """
    path = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=full_suffix(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp (and some writers) make 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name meddiff gives its temporaries (see the module docstring); never for a user's file."""
    return bool(_TEMPORARY.match(Path(path).name))


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove temporaries a killed writer left directly in ``folder``; returns what was removed."""
    removed = []
    for path in sorted(Path(folder).iterdir()):
        if is_temporary(path):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block, or refuse at once if another process holds it."""
    path = Path(folder) / LOCK_NAME
    with exclusive(path, f"{folder} is in use by another {what} — wait for it to finish, or choose another folder"):
        yield path


@contextlib.contextmanager
def exclusive(lock_file: Path, refusal: str) -> Iterator[None]:
    """Hold the lock on ``lock_file`` for the block, or raise ``refusal`` at once if another process holds it.

    ``filelock`` keeps its lock file on release (waiters share its inode). This helper removes the
    file at the end of the block, while still holding the lock, so no hidden file stays behind;
    that is safe because filelock treats a lock won on an unlinked inode as not won and tries the
    path again. A killed holder leaves the file but not the lock (the kernel drops flock locks with
    the process): the next run takes it and removes it.
    """
    from filelock import FileLock, Timeout

    held: list[os.stat_result] = []
    lock = FileLock(lock_file, timeout=0, on_acquired=lambda fd: held.append(os.fstat(fd)))
    try:
        lock.acquire()
    except Timeout:
        raise MeddiffError(refusal) from None
    try:
        yield
    finally:
        try:
            with contextlib.suppress(OSError):
                if held and os.path.samestat(os.lstat(lock_file), held[-1]):
                    lock_file.unlink()
        finally:
            lock.release()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks; for a folder (a DICOM series), of its visible files' bytes
    in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    # hidden names (meddiff's temporaries, a lock) are not part of a series
    files = sorted(p for p in path.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   ) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def staged_folder(out: str | os.PathLike, overwrite: bool, ours: Callable[[str], bool]) -> Iterator[Path]:
    """A folder written whole: the block fills the staging folder this yields, beside ``out``; it becomes ``out``
    when the block ends, and is removed if the block fails. An existing ``out`` is replaced only with ``overwrite``
    and only when every entry in it is one this writer makes (``ours(name)``): a folder holding anything else, or
    a file, is refused before any work, and nothing of the user's is deleted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MeddiffError(f"{out} is a file — this output is a folder: give a folder name")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MeddiffError(f"{out} exists — choose another folder or pass --overwrite")
        foreign = sorted(entry.name for entry in out.iterdir() if not ours(entry.name))
        if foreign:
            raise MeddiffError(f"{out} holds files meddiff did not write ({', '.join(foreign[:5])}) — --overwrite "
                               "replaces only what meddiff wrote: move them, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
