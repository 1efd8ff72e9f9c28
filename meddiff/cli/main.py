"""Entry point of the ``meddiff`` command.

Every subcommand module has ``add_parser(subparsers)`` (which sets ``func``). Bad input becomes one
``error: ...`` line on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from meddiff import __version__
from meddiff.cli import convert, denoise, evaluate, export, fit, generate, info, manifest
from meddiff.errors import MeddiffError

SUBCOMMANDS = (info, convert, manifest, fit, export, generate, denoise, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff", description="Diffusion models for medical images.")
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
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        args.func(args)
    except MeddiffError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into one line
        if args.debug:
            raise
        cause = user_error_cause(exc)
        message = str(cause) if cause else f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
