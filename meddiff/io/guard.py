"""Checks every reader makes before it trusts a file: sizes a header promises, and readers' own chatter.

A corrupt or hostile header can claim 10^9 voxels per axis, a negative size or none at all; nibabel,
pydicom and SimpleITK then fail with an allocation error that has an empty message, or print their
own lines (libpng, MetaIO, nibabel's header fixes) on the terminal before meddiff's one ``error:`` line.
The helpers here turn both into one sentence that names the file.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from meddiff.errors import MeddiffError

# deflate (gzip, zlib: .nii.gz, compressed MHA/NRRD, PNG) expands at most 1032:1 (zlib's technical
# details); a header promising more bytes than that from its file cannot be right.
MAX_DEFLATE_RATIO = 1032


def physical_memory() -> int | None:
    """Bytes of RAM on this machine, or None where the OS does not say (then no memory check is made)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_shape(path: Path, shape: Sequence[int], itemsize: int, available: int | None = None,
                compressed: bool = False) -> int:
    """Refuse a header's voxel grid that cannot be real: a size below 1, more voxel bytes than the file can
    hold (``available`` bytes after the header; deflate's limit when ``compressed``), or more float32
    voxels than this machine's memory. Returns the number of voxels."""
    dims = tuple(int(n) for n in shape)
    if not dims or any(n < 1 for n in dims):
        raise MeddiffError(f"{path}: the header gives the image size {dims}; "
                           "every axis needs at least 1 voxel — the header is corrupt: re-export the image")
    voxels = math.prod(dims)
    need = voxels * itemsize
    grid = " x ".join(map(str, dims))
    if available is not None:
        limit = available * MAX_DEFLATE_RATIO if compressed else available
        if need > limit:
            holds = (f"{available} compressed bytes (at most {limit} once expanded)" if compressed
                     else f"{available} bytes")
            raise MeddiffError(
                f"{path}: the header promises {grid} voxels ({need} bytes) but the file holds {holds} — "
                "the file is truncated or its header is corrupt: copy or export it again"
            )
    memory = physical_memory()
    if memory is not None and voxels * 4 > memory:
        raise MeddiffError(
            f"{path}: the header promises {grid} voxels ({gib(voxels * 4)} as float32), "
            f"more than this machine's memory ({gib(memory)}) — "
            "the header is corrupt, or crop/downsample the image first"
        )
    return voxels


def reason(exc: BaseException) -> str:
    """One line saying why a library failed: its last non-empty message line, else the exception's name."""
    if isinstance(exc, MemoryError):
        return "not enough memory to hold its voxels"
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return tidy(lines[-1]) if lines else type(exc).__name__


MAX_REASON = 200  # a library's message can quote kilobytes of the corrupt bytes it choked on


def tidy(line: str) -> str:
    """A library's message without C++ prefixes and object addresses (``ITK ERROR: PNGImageIO(0x55...):``),
    cut to a readable length."""
    line = re.sub(r"\(0x[0-9a-fA-F]+\)", "", line)
    line = re.sub(r"^(sitk::ERROR|ITK ERROR|ERROR):\s*", "", line).strip()
    line = "".join(c if c.isprintable() else "?" for c in line)  # garbled bytes must not move the terminal's cursor
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"


@contextlib.contextmanager
def native_stderr_captured() -> Iterator[list[str]]:
    """Collect what C/C++ code (ITK's MetaIO, libpng, GDCM) writes straight to file descriptor 2.

    Those libraries print to the process' stderr, where Python's redirection cannot reach, so a
    corrupt MHA or PNG would show three lines of C++ chatter above meddiff's one ``error:`` line.
    Written by hand (fd duplication, ~15 lines) rather than adding ``wurlitzer`` as a dependency.
    The yielded list receives the captured lines; on success they are written back unchanged, so
    nothing another thread printed meanwhile is lost; on failure the caller uses them as the reason.
    """
    captured: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        # fd 2 is shared by the whole process: two threads swapping it would leave it pointing at a temp
        # file for good (MONAI's CacheDataset reads images in threads); there the chatter stays visible
        yield captured
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (an embedding host): nothing to capture
        yield captured
        return
    ok = False
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            data = sink.read()
            captured.extend(ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip())
            if ok and data:
                os.write(2, data)


@contextlib.contextmanager
def readers_quiet() -> Iterator[None]:
    """Keep the readers' own complaints off the terminal: pydicom warns *and* logs every invalid header
    value (a garbled file prints dozens of lines, some kilobytes long), numpy and nibabel warn about
    odd values. A read either succeeds (the complaints did not matter) or ends in meddiff's one line."""
    if threading.current_thread() is not threading.main_thread():  # warning filters and log levels are process-wide:
        yield  # swapping them from several threads could leave them swapped for good
        return
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)
