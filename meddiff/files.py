"""File helpers: write-then-rename, so a failed or interrupted write never leaves a half-written output; content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from meddiff.errors import MeddiffError


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
        raise MeddiffError(f"{path} already exists — choose another output or pass --overwrite")
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=full_suffix(path), dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~UMASK)  # mkstemp (and some writers) make 0600; outputs get the usual mode
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in blocks; for a folder (a DICOM series), of its files' bytes in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
