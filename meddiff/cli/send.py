"""``meddiff send FOLDER AET@HOST:PORT``: send a DICOM output already written again, without recomputing it."""

from __future__ import annotations

from pathlib import Path

from meddiff.io.dicom_net import add_network_options, check_timeout, parse_destination, send_written


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("send", help="send a written DICOM series (or .dcm file) to a PACS with C-STORE")
    p.add_argument("path", metavar="FOLDER", help="the DICOM series folder or .dcm file meddiff wrote")
    p.add_argument("destination", metavar="AET@HOST:PORT", help="the PACS: AE title, host and DICOM port")
    add_network_options(p)
    p.set_defaults(func=run)


def run(args) -> None:
    check_timeout(args.timeout)  # every option is checked before the folder is read or the network used
    parse_destination(args.destination, name="the destination")
    stored = send_written(Path(args.path), args.destination, args.timeout)
    print(f"sent {stored} DICOM files to {args.destination}")
