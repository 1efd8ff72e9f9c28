"""The reliability corpus' harness: run a verb as a user would, then check how it ended and what it touched.

``run_meddiff`` calls the CLI in-process (importing torch once per worker, not once per case) with
stdout/stderr captured and SystemExit turned into its code. ``Snapshot`` records every file under
a folder (size, mtime, content hash) so a case can assert that nothing but its declared output
appeared, changed or vanished. ``assert_clean_error`` is the promise every failing case keeps:
exit code 2 (130 for an interrupt), exactly one ``error:`` line, last on stderr, no traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Result:
    code: int
    out: str
    err: str


def run_meddiff(*argv, cwd: str | os.PathLike | None = None) -> Result:
    """Run ``meddiff ARGV`` in this process; returns its exit code and what it printed."""
    from meddiff.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # a verb must not exit on its own; record how it did
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old)
    return Result(code, out.getvalue(), err.getvalue())


def assert_clean_error(result: Result, *fragments: str, code: int = 2) -> str:
    """Exit ``code``; exactly one ``error:`` line, the last on stderr; no traceback; fragments in it."""
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == code, f"exit {result.code}, stderr:\n{result.err}"
    assert "Traceback" not in result.err, result.err
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one final error: line, got:\n{result.err}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Snapshot:
    """Every file and folder under ``root``: (kind, size, mtime, sha256)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.entries = self._scan()

    def _scan(self) -> dict[str, tuple]:
        entries = {}
        for path in sorted(self.root.rglob("*")):
            rel = str(path.relative_to(self.root))
            if path.is_dir():
                entries[rel] = ("dir",)
            else:
                stat = path.stat()
                entries[rel] = ("file", stat.st_size, stat.st_mtime_ns, _digest(path))
        return entries

    def changes(self) -> dict[str, list[str]]:
        now = self._scan()
        return {
            "added": sorted(set(now) - set(self.entries)),
            "removed": sorted(set(self.entries) - set(now)),
            "changed": sorted(k for k in set(now) & set(self.entries) if now[k] != self.entries[k]),
        }

    def assert_unchanged(self, allowed: tuple[str, ...] = ()) -> None:
        """Nothing appeared, changed or vanished, except paths named in ``allowed`` (and below them)."""
        changes = self.changes()
        for kind, paths in changes.items():
            unexpected = [p for p in paths if not any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed)]
            assert not unexpected, f"{kind}: {unexpected}"


def verb_args(verb: str, defaults: dict[str, str], changes: list[str]) -> list[str]:
    """``meddiff VERB``'s arguments: ``defaults`` (option -> value), each replaced where ``changes`` (a flat list of
    option, value pairs) names it, the other changes appended."""
    options, extra = dict(defaults), []
    for name, value in zip(changes[::2], changes[1::2], strict=True):
        if name in options:
            options[name] = value
        else:
            extra += [name, value]
    return [verb, *[part for item in options.items() for part in item], *extra]


TINY_UNET = dict(channels=(16, 32), attention_levels=(False, True), num_head_channels=16, norm_num_groups=16)


def tiny_model_dir(folder: Path, spatial_dims: int = 2, **kwargs) -> Path:
    """A small exported model (16 px per side, random non-trivial weights): fast to load and sample."""
    import torch

    from meddiff.training import DiffusionModule

    torch.manual_seed(0)
    shape = (16,) * spatial_dims
    module = DiffusionModule.from_flat(
        spatial_dims=spatial_dims, image_shape=shape, image_spacing=(2.0,) * spatial_dims, **{**TINY_UNET, **kwargs}
    )
    for p in module.unet.parameters():  # MONAI zero-initialises the output layer: make the net non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return module.pipeline(ema=False).save_pretrained(folder)
