"""Send DICOM files to a PACS with C-STORE (pynetdicom): ``--send AET@HOST:PORT`` and ``meddiff send``.

Every wait on the network is bounded by one ``--timeout`` (TCP connect, association, each C-STORE answer, an idle
connection), and every way a send can fail (nothing listening, a refused AE title, a listener that never answers, a
store status other than success) is one :class:`SendError` line that names the destination and the reason.
``send_written`` adds where the complete output is kept and the command that sends it again.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import re
import shlex
import sys
import time
from pathlib import Path

from meddiff.errors import MeddiffError, first_line

CALLING_AE = "MEDDIFF"
DEFAULT_TIMEOUT = 30.0
_DESTINATION = re.compile(r"^([^@\s\\]{1,16})@([^:\s]+):(\d{1,5})$")


class SendError(MeddiffError):
    """A send that failed on the network side: ``destination`` and ``reason`` kept apart for the caller's line."""

    def __init__(self, destination: str, reason: str, hint: str = "check the address, the PACS and --timeout"):
        self.destination, self.reason = destination, reason
        super().__init__(f"cannot send to {destination}: {reason} — {hint}")


def parse_destination(text: str, name: str = "--send") -> tuple[str, str, int]:
    """``AET@HOST:PORT`` -> (called AE title, host, port), refused in one line when malformed."""
    match = _DESTINATION.match(text or "")
    if not match or not 0 < int(match.group(3)) < 65536:
        raise MeddiffError(f"{name} takes AET@HOST:PORT, not {text!r} — give the PACS's AE title (at most 16 "
                           "characters), host and DICOM port, e.g. ORTHANC@localhost:4242")
    return match.group(1), match.group(2), int(match.group(3))


def check_timeout(value: float) -> float:
    """A network timeout in seconds: finite and > 0, else one line."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise MeddiffError(f"--timeout takes seconds > 0, not {value!r} — e.g. --timeout 30")
    return seconds


def add_network_options(parser: argparse.ArgumentParser) -> None:
    """``--timeout SECONDS`` for the verbs that talk to a PACS (check it with ``check_timeout`` before any work)."""
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="longest wait for the PACS to connect, accept the association and answer each C-STORE "
                             f"(default {DEFAULT_TIMEOUT:g})")


def dicom_files(path: Path) -> list[Path]:
    """The files of a written DICOM output: the file itself, or a series folder's ``*.dcm`` (hidden names skipped:
    meddiff's temporaries are never data)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.glob("*.dcm") if not p.name.startswith(".") and p.is_file())


def _headers(files: list[Path]) -> list:
    """Each file's header (no pixels); a file that is not a storable DICOM instance is refused by name."""
    import pydicom

    headers = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on a file that is not DICOM
            raise MeddiffError(f"{file} is not DICOM ({first_line(exc)}) — send only the DICOM files meddiff "
                               "wrote") from exc
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds or "TransferSyntaxUID" not in ds.file_meta:
            raise MeddiffError(f"{file} is not a DICOM instance a PACS can store (no SOP class, SOP instance or "
                               "transfer syntax) — send only the DICOM files meddiff wrote")
        headers.append(ds)
    return headers


class _Recorder(logging.Handler):
    """Keeps pynetdicom's error lines (the reason a TCP connect failed) instead of printing them."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quiet_pynetdicom():
    """pynetdicom's log lines recorded, not printed (failures become one MeddiffError line); restored after."""
    logger = logging.getLogger("pynetdicom")
    saved = logger.level, logger.handlers[:], logger.propagate
    recorder = _Recorder()
    logger.setLevel(logging.ERROR)
    logger.handlers[:] = [recorder]
    logger.propagate = False
    try:
        yield recorder
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]


def _associate(ae, aet: str, host: str, port: int, destination: str, timeout: float, recorder: _Recorder):
    """An established association, or a SendError saying why not (no connection, rejected, silent, no context)."""
    from pynetdicom import evt

    seen: dict = {}

    def on_acse(event):
        seen.setdefault("response", event.primitive)

    handlers = [(evt.EVT_CONN_OPEN, lambda event: seen.setdefault("connected", True)),
                (evt.EVT_ACCEPTED, lambda event: seen.setdefault("accepted", True)),
                (evt.EVT_ACSE_RECV, on_acse)]
    start = time.monotonic()
    try:
        association = ae.associate(host, port, ae_title=aet, evt_handlers=handlers)
    except OSError as exc:  # the host name does not resolve (pynetdicom looks it up before connecting)
        raise SendError(destination, f"no association (cannot connect to {host}:{port}: {exc.strerror or exc}; is "
                                     "the host name right?)") from exc
    if association.is_established:
        return association
    elapsed = time.monotonic() - start
    if not seen.get("connected"):
        why = next((m.split(":", 1)[1].strip() for m in recorder.messages if "TCP Initialisation Error" in m),
                   f"no connection within {timeout:g} s" if elapsed >= timeout * 0.9 else "connection failed")
        reason = f"no association (cannot connect to {host}:{port}: {why}; is the PACS running there?)"
    elif association.is_rejected:
        response = seen.get("response")
        detail = getattr(response, "reason_str", "no reason given")
        reason = (f"no association (rejected by the PACS: {detail}; does it know called AE title {aet} and calling "
                  f"AE title {CALLING_AE}?)")
    elif seen.get("accepted"):
        reason = "no association (the PACS accepts none of the files' SOP classes and transfer syntaxes)"
    elif elapsed >= timeout * 0.9:
        reason = (f"no association (no answer to the association request within {timeout:g} s; is {host}:{port} a "
                  "DICOM listener?)")
    else:
        reason = f"no association (the connection was closed without an answer; is {host}:{port} a DICOM listener?)"
    raise SendError(destination, reason)


def _progress(total: int):
    """A one-line bar on a terminal; one ``sent k/N`` line per file otherwise (logs, captured output)."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sent", unit="file", file=sys.stderr, leave=True)
        return bar.update, bar.close
    count = [0]

    def update(n: int = 1) -> None:
        count[0] += n
        print(f"sent {count[0]}/{total}", file=sys.stderr, flush=True)

    return update, lambda: None


def send(files: list[Path], destination: str, timeout: float = DEFAULT_TIMEOUT, progress: bool = True) -> int:
    """C-STORE every file to ``destination`` in one association; the number stored.

    ``timeout`` bounds the TCP connect, the association request, each C-STORE answer and an idle connection. Every
    failure is a :class:`SendError` naming the destination and the reason; a file that is not DICOM is refused by
    name before any network use.
    """
    import pydicom
    from pynetdicom import AE

    aet, host, port = parse_destination(destination)
    timeout = check_timeout(timeout)
    files = [Path(f) for f in files]
    headers = _headers(files)
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in headers})
    if len(contexts) > 128:
        raise MeddiffError(f"the files need {len(contexts)} SOP class/transfer syntax pairs, more than one "
                           "association carries (128) — send them in smaller folders")
    ae = AE(ae_title=CALLING_AE)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    if progress:
        print(f"connecting to {destination} (timeout {timeout:g} s) ...", file=sys.stderr, flush=True)
    with _quiet_pynetdicom() as recorder:
        association = _associate(ae, aet, host, port, destination, timeout, recorder)
        update, close = _progress(len(files)) if progress else (lambda n=1: None, lambda: None)
        sent, released = 0, False
        try:
            for file in files:
                try:
                    status = association.send_c_store(pydicom.dcmread(file))
                except (RuntimeError, ValueError) as exc:  # no accepted context for this file, association gone
                    raise SendError(destination, f"{file.name} not stored ({first_line(exc)}); {sent} of "
                                                 f"{len(files)} files sent") from exc
                if not status or status.Status != 0x0000:
                    code = (f"status 0x{status.Status:04X}" if status else
                            f"no answer within {timeout:g} s or the association was aborted")
                    raise SendError(destination, f"{file.name} not stored ({code}); {sent} of {len(files)} files "
                                                 "sent")
                sent += 1
                update(1)
            association.release()
            released = True
        finally:
            close()
            if not released:
                association.abort()
    return sent


def send_written(path: Path, destination: str, timeout: float) -> int:
    """Send an output meddiff has written (a ``.dcm`` file or a series folder); the number of files stored.

    The output is checked first (it exists, holds ``.dcm`` files, each is DICOM); a failed send says, in its one
    line, that the complete output is kept and how to send it again.
    """
    path = Path(path)
    parse_destination(destination)  # a malformed destination is refused before the files are looked at
    timeout = check_timeout(timeout)
    if not path.exists():
        raise MeddiffError(f"{path} does not exist — give the DICOM folder or .dcm file meddiff wrote")
    files = dicom_files(path)
    if not files:
        raise MeddiffError(f"{path} holds no .dcm files — give the DICOM folder or .dcm file meddiff wrote")
    kept = f"the complete series is kept in {path}" if path.is_dir() else f"the complete file is kept at {path}"
    try:
        return send(files, destination, timeout)
    except SendError as exc:
        again = f"meddiff send {shlex.quote(str(path))} {shlex.quote(destination)}"
        if timeout != DEFAULT_TIMEOUT:
            again += f" --timeout {timeout:g}"
        raise MeddiffError(f"cannot send to {destination}: {exc.reason} — {kept}; "
                           f"send it again with '{again}'") from exc
