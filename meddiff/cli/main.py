"""Entry point of the ``meddiff`` command.

Every subcommand module has ``add_parser(subparsers)`` (which sets ``func``). Bad input becomes one
``error: ...`` line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from meddiff import __version__
from meddiff.cli import (
    audit,
    convert,
    denoise,
    edit,
    evaluate,
    export,
    export_bundle,
    fit,
    generate,
    importer,
    info,
    inpaint,
    manifest,
    send,
    upsample,
)
from meddiff.errors import MeddiffError, first_line

SUBCOMMANDS = (info, convert, manifest, fit, export, importer, export_bundle, generate, denoise, inpaint, edit,
               upsample, evaluate, audit, send)


class UsageError(MeddiffError):
    """A command line argparse cannot parse."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error:`` line that names the help to read (not usage + error)."""

    def error(self, message: str):
        raise UsageError(f"{message} — see '{self.prog} --help'")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="meddiff", description="Diffusion models for medical images.")
    parser.add_argument("--version", action="version", version=f"meddiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def user_error_cause(exc: BaseException) -> MeddiffError | None:
    """The MeddiffError inside a wrapped exception (MONAI wraps transform errors in RuntimeError)."""
    while exc is not None:
        if isinstance(exc, MeddiffError):
            return exc
        exc = exc.__cause__  # explicit chains only (MONAI raises "from e"); __context__ may be an older, handled error
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "passthrough", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.extra = extra
    previous = (
        signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return run(args)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def interrupt(signum, frame):
    """SIGTERM (a scheduler's kill, ``timeout``) ends a verb as Ctrl-C does: temporaries removed, exit 130."""
    raise KeyboardInterrupt


def run(args) -> int:
    """Run the chosen verb; every failure becomes one ``error:`` line (see the module docstring).

    Ctrl-C or SIGTERM: exit 130 and one line saying what the verb left, ``args.resume_hint`` (set by a verb that
    can leave something: generate, fit, export, inpaint, a --send), else that nothing was written (every other verb
    writes to temporaries renamed when complete).
    """
    import errno

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args.func(args)
    except MeddiffError as exc:
        if args.debug:
            raise
        print(f"error: {first_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None) or "nothing was written; run the command again"
        print(f"error: interrupted — {hint}", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system said no (full disk, permissions, a folder where a file should be)
        if args.debug:
            raise
        # a full disk fails a write(), which names no file: the verb's output is the one being written
        target = exc.filename or getattr(args, "output", None) or getattr(args, "json_out", None)
        where = f" {target}" if target else ""
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            print(f"error: cannot write{where}: {exc.strerror or first_line(str(exc))} "
                  "— free space on that disk (or choose an output on another one) and run the command again",
                  file=sys.stderr)
        else:
            print(f"error: cannot use{where}: {exc.strerror or first_line(str(exc))} "
                  "— check the path, its permissions and free space", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if args.debug:
            raise
        from meddiff.weights import load_error_line

        cause = user_error_cause(exc)
        mismatch = load_error_line(exc) if isinstance(exc, RuntimeError) else None
        message = (
            str(cause)
            if cause
            else f"{mismatch} — use weights saved from the same model configuration"
            if mismatch
            else f"internal error ({type(exc).__name__}: {exc}) — rerun with --debug and report the traceback"
        )
        print(f"error: {first_line(message)}", file=sys.stderr)
        return 2
    return 0



if __name__ == "__main__":
    sys.exit(main())
