"""Send DICOM files to a PACS with C-STORE (pynetdicom): ``--send AET@HOST:PORT``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from meddiff.errors import MeddiffError

CALLING_AE = "MEDDIFF"
_DESTINATION = re.compile(r"^([^@\s\\]{1,16})@([^:\s]+):(\d{1,5})$")


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (called AE title, host, port), refused in one line when malformed."""
    match = _DESTINATION.match(text or "")
    if not match or not 0 < int(match.group(3)) < 65536:
        raise MeddiffError(f"--send takes AET@HOST:PORT (e.g. ORTHANC@localhost:4242), not {text!r}")
    return match.group(1), match.group(2), int(match.group(3))


def dicom_files(path: Path) -> list[Path]:
    """The files of a written DICOM output: the file itself, or a series folder's ``*.dcm``."""
    return sorted(path.glob("*.dcm")) if path.is_dir() else [path]


def send(files: list[Path], destination: str) -> int:
    """C-STORE every file to ``destination`` in one association; the number stored. A refused association or
    any failed store is an error naming the destination."""
    import pydicom
    from pynetdicom import AE

    aet, host, port = parse_destination(destination)
    datasets = [pydicom.dcmread(file) for file in files]
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # failures become one MeddiffError line
    ae = AE(ae_title=CALLING_AE)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [str(ds.file_meta.TransferSyntaxUID) for ds in datasets][:1])
    association = ae.associate(host, port, ae_title=aet)
    if not association.is_established:
        raise MeddiffError(f"cannot send to {destination}: no association (is the PACS running, and does it accept "
                           f"AE title {CALLING_AE}?)")
    try:
        for file, ds in zip(files, datasets, strict=True):
            status = association.send_c_store(ds)
            if not status or status.Status != 0x0000:
                code = f"0x{status.Status:04X}" if status else "no response"
                raise MeddiffError(f"{destination} did not store {file.name} (status {code})")
    finally:
        association.release()
    return len(files)
