"""``--format dcm`` and ``--send`` for the verbs that write a processed scan (denoise, inpaint, convert).

A DICOM input gives a derived series in the input's study (``write_derived_dicom``); any other input a new
de-identified study (``write_synthetic_dicom``). The output is a folder of slices, or one file when ``-o`` ends in
``.dcm`` and the result is a single slice.
"""

from __future__ import annotations

from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import full_suffix


def add_options(p, send: bool = True, seg: bool = False) -> None:
    p.add_argument("--format", choices=["dcm", "seg"] if seg else ["dcm"],
                   help="dcm: write DICOM into the -o folder: a new series of the input's study for DICOM input, "
                        "else a new de-identified study" + ("; seg: a mask or label map as a DICOM SEG file "
                                                            "of the --template series" if seg else "")
                        + " (default: the -o suffix decides)")
    if send:
        p.add_argument("--send", metavar="AET@HOST:PORT", help="send the DICOM output to a PACS with C-STORE")


def wants_dicom(args, output: str) -> bool:
    return args.format in ("dcm", "seg") or full_suffix(output) == ".dcm"


def check(args, outputs: list[Path]) -> bool:
    """Before any work: refuse a malformed --send or one without DICOM output, and an existing DICOM output;
    whether the output is DICOM (other outputs are the caller's to check)."""
    from meddiff.io.dicom_net import parse_destination

    dicom = wants_dicom(args, str(outputs[0]))
    if getattr(args, "send", None):
        if not dicom:
            raise MeddiffError("--send sends DICOM: add --format dcm")
        parse_destination(args.send)
    for out in outputs if dicom else []:
        if out.exists() and not args.overwrite:
            raise MeddiffError(f"{out} already exists — choose another output or pass --overwrite")
    return dicom


def write(result, out: Path, args, source: str | Path, task: str, description: str) -> Path:
    """``result`` as DICOM at ``out`` (derived from ``source`` when it is DICOM), then sent where --send says."""
    from meddiff.io import is_dicom_path
    from meddiff.io.dicom_net import dicom_files, send
    from meddiff.io.dicom_write import write_derived_dicom, write_synthetic_dicom

    if is_dicom_path(source):
        write_derived_dicom(result, source, out, description, task, series=getattr(args, "series", None),
                            overwrite=args.overwrite)
    else:
        write_synthetic_dicom(result, out, description, overwrite=args.overwrite, task=task)
    if getattr(args, "send", None):
        stored = send(dicom_files(out), args.send)
        print(f"sent {stored} DICOM files to {args.send}")
    return out
