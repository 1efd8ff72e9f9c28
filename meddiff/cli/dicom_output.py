"""What the verbs that write a processed scan (denoise, inpaint, convert) check before work, and how they write.

``guarded`` runs before any work and holds each output's lock until the verb ends (``meddiff.outputs``): no output
may be an input, the template or the mask, or lie inside or contain one; an existing output needs ``--overwrite``
and a series folder may hold only meddiff's own earlier series; a malformed ``--send`` is refused. ``check_subject``
refuses to combine DICOM objects of different patients, studies or frames of reference (and modalities that
contradict each other) unless ``--allow-other-patient`` says it is meant. ``write`` then writes DICOM: a DICOM
input gives a derived series in the input's study (``write_derived_dicom``); any other input a new de-identified
study (``write_synthetic_dicom``). The output is a folder of slices, or one file when ``-o`` ends in ``.dcm`` and
the result is a single object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from meddiff.errors import MeddiffError
from meddiff.files import check_writable, full_suffix


def add_options(p, send: bool = True, seg: bool = False, pairs: str = "the mask") -> None:
    p.add_argument("--format", choices=["dcm", "seg"] if seg else ["dcm"],
                   help="dcm: write DICOM into the -o folder: a new series of the input's study for DICOM input, "
                        "else a new de-identified study" + ("; seg: a mask or label map as a DICOM SEG file "
                                                            "of the --template series" if seg else "")
                        + " (default: the -o suffix decides)")
    p.add_argument("--allow-other-patient", action="store_true",
                   help=f"research use only: combine the input with {pairs} although their DICOM PatientID, study or "
                        "frame of reference differ (recorded in the output's DerivationDescription)")
    p.add_argument("--deidentify", action="store_true",
                   help="research export: the DICOM output under PS3.15's basic confidentiality profile (new "
                        "patient, study and UIDs, dates shifted) instead of a series of the patient's study")
    if send:
        from meddiff.io.dicom_net import add_network_options

        p.add_argument("--send", metavar="AET@HOST:PORT", help="send the DICOM output to a PACS with C-STORE")
        add_network_options(p)


def wants_dicom(args, output: str) -> bool:
    return args.format in ("dcm", "seg") or full_suffix(output) == ".dcm"


def check_output_kind(args, verb: str) -> bool:
    """Whether ``-o`` is DICOM; an output suffix no writer takes is refused in one line, before any work."""
    from meddiff.io import WRITE_SUFFIXES

    dicom = wants_dicom(args, args.output)
    suffix = full_suffix(Path(args.output))
    if not dicom and suffix not in WRITE_SUFFIXES:
        raise MeddiffError(f"{args.output}: cannot write '{suffix}' "
                           f"— meddiff {verb} writes {', '.join(WRITE_SUFFIXES)}, or DICOM with --format dcm")
    return dicom


@contextlib.contextmanager
def guarded(args, outputs: list[Path], sources: Mapping[str, str | None]) -> Iterator[bool]:
    """Check the outputs before any work and hold their locks for the block; yields whether they are DICOM.

    ``sources`` names what the verb reads (``{"the input": args.input, "the mask": args.mask}``): none of them may
    be an output, lie inside one or contain one.
    """
    from meddiff.outputs import check_not_source, check_series_output, output_lock

    dicom = wants_dicom(args, str(outputs[0]))
    if getattr(args, "send", None):
        from meddiff.io.dicom_net import check_timeout, parse_destination

        if not dicom:
            raise MeddiffError("--send sends DICOM: add --format dcm")
        parse_destination(args.send)
        check_timeout(args.timeout)
    if args.deidentify and not dicom:
        raise MeddiffError("--deidentify is for DICOM output (NIfTI and pictures carry no identity): add --format dcm")
    if args.deidentify and args.format == "seg":
        raise MeddiffError("--deidentify is for image series: a SEG refers to its series by the patient's UIDs "
                           "— export the series with --deidentify and segment that")
    for out in outputs:
        check_not_source(out, sources, dicom)
    with contextlib.ExitStack() as stack:
        for out in outputs:
            stack.enter_context(output_lock(out))  # before the checks: a folder they create goes with the lock
            if dicom and full_suffix(out) != ".dcm":
                check_series_output(out, args.overwrite)
            else:
                check_writable(out, args.overwrite)
        yield dicom


def check_subject(image_path: str | Path, other_path: str | Path | None, other_role: str, args,
                  series: str | int | None = None, theirs: dict[str, str] | None = None) -> list[str]:
    """Refuse to combine two DICOM objects (input and template, image and mask) of different patients, studies or
    frames of reference, naming both values, unless ``--allow-other-patient``; what differs (recorded in the
    output's provenance). Non-DICOM files carry no identity and pass. ``theirs``: the other object's identity when
    the caller has read it already."""
    from meddiff.io import is_dicom_path
    from meddiff.io.dicom import IDENTITY_KEYS, identity

    if not other_path or not is_dicom_path(image_path) or not is_dicom_path(other_path):
        return []
    ours, theirs = identity(Path(image_path), series), theirs or identity(Path(other_path))
    differ = [key for key in IDENTITY_KEYS if ours[key] != theirs[key]]
    if differ and not args.allow_other_patient:
        shown = "; ".join(f"{key} {ours[key]!r} vs {theirs[key]!r}" for key in differ)
        raise MeddiffError(f"{image_path} and {other_role} {other_path} belong to different patients, studies or "
                           f"frames of reference ({shown}) — use {other_role} of the same scan, or pass "
                           "--allow-other-patient for research use (recorded in the output)")
    return differ


def check_modalities(modality: str | None, other: str | None, what: str) -> None:
    """Refuse images of one modality written with (or as) another's: CT values in HU as MR storage."""
    from meddiff.pipelines.volumes import MODALITY_FAMILIES

    ours, theirs = (MODALITY_FAMILIES.get((m or "").upper()) for m in (modality, other))
    if ours and theirs and ours != theirs:
        raise MeddiffError(f"the image is {modality} but {what} is {other}: its values would be stored as "
                           f"{other} — use a {modality} template, or convert without one")


def check_dicom_shape(out: Path, array_shape: tuple[int, ...], source: str | Path | None,
                      series: str | int | None = None) -> None:
    """A ``.dcm`` output holds one object: refuse, before any work, a series that would need a folder (a DICOM
    ``source``: one object per file of its ``series``, as ``write`` derives them)."""
    from meddiff.io import is_dicom_path
    from meddiff.io.dicom import source_slices

    if full_suffix(out) != ".dcm":
        return
    if source is not None and is_dicom_path(source):
        count = len(source_slices(Path(source), series))
    else:
        count = array_shape[2] if len(array_shape) == 3 else 1
    if count > 1:
        raise MeddiffError(f"{out}: the result is a series of {count} DICOM objects, written as a folder — give -o "
                           "a folder name without .dcm")


def provenance(description: str, differ: list[str]) -> str:
    """The DerivationDescription, saying when objects of another patient, study or frame were combined."""
    if not differ:
        return description
    return f"{description}; --allow-other-patient: combined with an object of another {', '.join(differ)}"


def write(result, out: Path, args, source: str | Path, task: str, description: str, resampled: bool = False) -> Path:
    """``result`` as DICOM at ``out`` (derived from ``source`` when it is DICOM: on its grid, or with ``resampled``
    new slices along its slice direction), then sent where --send says."""
    from meddiff.io import is_dicom_path
    from meddiff.io.dicom_write import write_derived_dicom, write_resampled_dicom, write_synthetic_dicom

    if is_dicom_path(source):
        writer = write_resampled_dicom if resampled else write_derived_dicom
        writer(result, source, out, description, task, series=getattr(args, "series", None),
               overwrite=args.overwrite, deidentify=args.deidentify)
    else:
        write_synthetic_dicom(result, out, description, overwrite=args.overwrite, task=task)
    if getattr(args, "send", None):
        from meddiff.io.dicom_net import send_written

        try:
            stored = send_written(out, args.send, args.timeout)
        except KeyboardInterrupt:  # the output is complete: say how to send it without computing it again
            args.resume_hint = f"{out} is complete; send it with 'meddiff send {out} {args.send}'"
            raise
        print(f"sent {stored} DICOM files to {args.send}")
    return out
