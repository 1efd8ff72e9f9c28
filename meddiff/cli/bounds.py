"""Range checks of numeric options and output folders, shared by every verb (no argparse: they run inside a verb's
``run``, before any work, and raise one ``MeddiffError`` line).

``check_range(value, flag, low, high, what_to_do)``: a whole number within ``low..high`` (``high`` None: no upper
bound). ``check_seed(value)``: every ``--seed`` takes ``0..SEED_MAX`` (2**32 - 1, the range NumPy's legacy seeding,
torch's and every tool a user may compare with accept alike). ``check_output_folder(path)``: ``-o`` that must be a
folder is not an existing file, nor inside one.
"""

from __future__ import annotations

import os
from pathlib import Path

from meddiff.errors import MeddiffError

SEED_MAX = 2**32 - 1
SEED_HELP = f"random seed, 0 .. {SEED_MAX} (default: %(default)s)"


def check_range(value, flag: str, low: int, high: int | None = None, what_to_do: str | None = None) -> int:
    """``value`` if it is a whole number in ``low..high`` (``high`` None: at least ``low``), else one line naming
    ``flag``, the range and ``what_to_do`` (default: give a number in the range)."""
    span = f"from {low} to {high}" if high is not None else f"at least {low}"
    fits = (not isinstance(value, bool) and isinstance(value, int)
            and low <= value and (high is None or value <= high))
    if not fits:
        shown = value if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        raise MeddiffError(f"{flag} must be a whole number {span}, not {shown} — "
                           f"{what_to_do or f'give {flag} a number in that range'}")
    return value


def check_seed(value, flag: str = "--seed") -> int:
    """``value`` if it is a seed in ``0..SEED_MAX``; one line otherwise."""
    return check_range(value, flag, 0, SEED_MAX, f"give {flag} a number from 0 to {SEED_MAX}")


def check_output_folder(path: str | os.PathLike, flag: str = "-o", what: str = "the output") -> Path:
    """``path`` as a Path, if it can become a folder: not an existing file, and no file where a folder above it
    should be. Checked before work, so a file given as ``-o`` is refused in words, not as ``File exists``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MeddiffError(f"{path} is a file — give {flag} a folder for {what}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MeddiffError(f"{parent} is a file, not a folder — give {flag} a folder path for {what}")
            break
    return path
