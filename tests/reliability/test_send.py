"""``meddiff send FOLDER AET@HOST:PORT``: what was written is sent again, and a send that fails says so in one line.

Every failure (nothing listening, a listener that never answers, a refused AE title, a store status other than
success) is exit 2 and one ``error:`` line naming the destination, the reason, where the complete output is kept and
the command that sends it again; the written files are never touched. Bad options and bad folders are refused before
any network use. The successful sends run against an in-process pynetdicom storage SCP and, where the ``Orthanc``
binary is installed, a real local PACS (found again with C-FIND).
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from harness import Snapshot, assert_clean_error, run_meddiff
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def free_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def series(tmp_path) -> Path:
    """A written series of two real MR slices (fresh SOP instance UIDs), plus a hidden temporary that is not data."""
    folder = tmp_path / "out"
    folder.mkdir()
    source = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for index in range(2):
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        source.InstanceNumber = index + 1
        source.save_as(folder / f"slice_{index:04d}.dcm")
    (folder / ".slice_0002.meddiff-tmp-abcdefgh.dcm").write_bytes(b"half a file")  # left by a kill: never sent
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any association attempt fails the test: the case must be refused before the network is used."""
    from pynetdicom import AE

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(AE, "associate", refuse)


@pytest.fixture
def listener():
    """A plain TCP server in a thread: ``listener("silent")`` accepts and never answers, ``listener("close")`` hangs
    up at once; returns its port."""
    servers, connections, stop = [], [], threading.Event()

    def start(mode: str) -> int:
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.1)
        servers.append(server)

        def serve():
            while not stop.is_set():
                try:
                    connection, _ = server.accept()
                except (TimeoutError, OSError):
                    continue
                if mode == "close":
                    connection.close()
                else:
                    connections.append(connection)  # read nothing, answer nothing

        threading.Thread(target=serve, daemon=True).start()
        return server.getsockname()[1]

    yield start
    stop.set()
    for s in connections + servers:
        s.close()


@pytest.fixture
def store_scp():
    """An in-process storage SCP (pynetdicom) titled STORESCP that checks the called AE title:
    ``store_scp(status, delay)`` answers every C-STORE with ``status`` after ``delay`` seconds; returns (port, the
    datasets stored)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    servers = []

    def start(status: int = 0x0000, delay: float = 0.0):
        stored = []

        def on_store(event):
            time.sleep(delay)
            if status == 0x0000:
                stored.append(event.dataset)
            return status

        ae = AE("STORESCP")
        ae.require_called_aet = True
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        servers.append(server)
        return server.server_address[1], stored

    yield start
    for server in servers:
        server.shutdown()


def assert_kept(result, series: Path, destination: str, *fragments: str) -> str:
    """The one line of a failed send: destination, reason, the complete series kept, the command to resend."""
    line = assert_clean_error(result, f"cannot send to {destination}:", *fragments,
                              f"the complete series is kept in {series}",
                              f"send it again with 'meddiff send {series} {destination}")
    assert result.out == ""
    return line


def test_a_closed_port_is_one_line_and_the_series_is_kept(series, tmp_path):
    before = Snapshot(tmp_path)
    destination = f"NOBODY@127.0.0.1:{free_port()}"
    result = run_meddiff("send", series, destination, "--timeout", "5")
    assert_kept(result, series, destination, "no association", "cannot connect to 127.0.0.1")
    assert f"connecting to {destination} (timeout 5 s)" in result.err
    before.assert_unchanged()


def test_a_silent_listener_times_out_in_one_line(series, tmp_path, listener):
    before = Snapshot(tmp_path)
    destination = f"SILENT@127.0.0.1:{listener('silent')}"
    start = time.monotonic()
    result = run_meddiff("send", series, destination, "--timeout", "1")
    assert time.monotonic() - start < 5
    line = assert_kept(result, series, destination, "no answer to the association request within 1 s")
    assert "--timeout 1'" in line  # the command to send again keeps the timeout the user chose
    before.assert_unchanged()


def test_a_listener_that_hangs_up_is_one_line(series, listener):
    destination = f"HANGUP@127.0.0.1:{listener('close')}"
    start = time.monotonic()
    result = run_meddiff("send", series, destination, "--timeout", "3")
    assert time.monotonic() - start < 5
    assert_kept(result, series, destination, "no association")


def test_a_refused_ae_title_is_one_line(series, tmp_path, store_scp):
    port, stored = store_scp()
    before = Snapshot(tmp_path)
    destination = f"WRONG@127.0.0.1:{port}"
    result = run_meddiff("send", series, destination, "--timeout", "5")
    assert_kept(result, series, destination, "no association (rejected by the PACS: Called AE title not recognised")
    assert stored == []
    before.assert_unchanged()


def test_a_store_status_other_than_success_is_one_line(series, tmp_path, store_scp):
    port, _ = store_scp(0xA700)  # out of resources
    before = Snapshot(tmp_path)
    destination = f"STORESCP@127.0.0.1:{port}"
    result = run_meddiff("send", series, destination, "--timeout", "5")
    assert_kept(result, series, destination, "slice_0000.dcm not stored (status 0xA700)", "0 of 2 files sent")
    before.assert_unchanged()


def test_a_pacs_that_does_not_answer_a_store_times_out_in_one_line(series, tmp_path, store_scp):
    port, _ = store_scp(delay=2.0)
    destination = f"STORESCP@127.0.0.1:{port}"
    start = time.monotonic()
    result = run_meddiff("send", series, destination, "--timeout", "0.5")
    assert time.monotonic() - start < 5
    assert_kept(result, series, destination, "slice_0000.dcm not stored (no answer within 0.5 s", "0 of 2 files sent")


def test_a_written_series_is_sent_again_file_by_file(series, tmp_path, store_scp):
    port, stored = store_scp()
    before = Snapshot(tmp_path)
    destination = f"STORESCP@127.0.0.1:{port}"
    result = run_meddiff("send", series, destination)
    assert result.code == 0, result.err
    assert result.out.strip() == f"sent 2 DICOM files to {destination}"
    assert f"connecting to {destination} (timeout 30 s)" in result.err and "sent 2/2" in result.err
    assert sorted(ds.SOPInstanceUID for ds in stored) == sorted(
        pydicom.dcmread(f).SOPInstanceUID for f in series.glob("slice_*.dcm"))
    single = run_meddiff("send", series / "slice_0001.dcm", destination)
    assert single.code == 0 and single.out.strip() == f"sent 1 DICOM files to {destination}"
    before.assert_unchanged()


@pytest.mark.parametrize("destination", ["ORTHANC@localhost", "localhost:4242", "ORTHANC@localhost:0",
                                         "ORTHANC@localhost:70000", "A_TITLE_LONGER_THAN_16@localhost:4242", ""])
def test_a_malformed_destination_is_refused_before_any_network_use(destination, series, tmp_path, no_network):
    before = Snapshot(tmp_path)
    assert_clean_error(run_meddiff("send", series, destination), "AET@HOST:PORT", repr(destination))
    before.assert_unchanged()


@pytest.mark.parametrize("timeout, message", [("0", "--timeout takes seconds > 0"), ("-1", "seconds > 0"),
                                              ("nan", "seconds > 0"), ("inf", "seconds > 0"),
                                              ("soon", "invalid float value")])
def test_a_bad_timeout_is_refused_before_any_network_use(timeout, message, series, tmp_path, no_network):
    before = Snapshot(tmp_path)
    assert_clean_error(run_meddiff("send", series, "ORTHANC@127.0.0.1:4242", "--timeout", timeout), message)
    before.assert_unchanged()


def test_bad_folders_and_files_are_refused_by_name(series, tmp_path, no_network):
    destination = "ORTHANC@127.0.0.1:4242"
    missing = tmp_path / "missing"
    assert_clean_error(run_meddiff("send", missing, destination), f"{missing} does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".slice_0000.meddiff-tmp-abcdefgh.dcm").write_bytes(b"hidden names are never data")
    assert_clean_error(run_meddiff("send", empty, destination), f"{empty} holds no .dcm files")

    (series / "notes.dcm").write_text("not a DICOM file")
    before = Snapshot(tmp_path)
    assert_clean_error(run_meddiff("send", series, destination), f"{series / 'notes.dcm'} is not DICOM")
    nifti = tmp_path / "scan.nii.gz"
    nifti.write_bytes(b"\x1f\x8b not DICOM either")
    assert_clean_error(run_meddiff("send", nifti, destination), f"{nifti} is not DICOM")
    before.assert_unchanged(allowed=("scan.nii.gz",))


def find_instances(orthanc, study_uid: str) -> set[str]:
    """C-FIND: the SOP instance UIDs the PACS holds in a study."""
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    aet, host, port = orthanc
    ae = AE("MEDDIFF")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    association = ae.associate(host, port, ae_title=aet)
    assert association.is_established
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "IMAGE", study_uid
    query.SeriesInstanceUID = query.SOPInstanceUID = ""
    found = {str(identifier.SOPInstanceUID) for status, identifier in
             association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
             if status and status.Status in (0xFF00, 0xFF01)}
    association.release()
    return found


def test_a_written_series_is_sent_again_to_a_pacs(orthanc, tmp_path):
    """A series meddiff wrote (``convert --format dcm``) goes to Orthanc with ``meddiff send``; C-FIND finds every
    instance; sending it again stores the same instances (no duplicates), the folder unchanged."""
    out = tmp_path / "written"
    assert run_meddiff("convert", get_testdata_file("MR_small.dcm"), out, "--format", "dcm").code == 0
    files = sorted(out.glob("*.dcm")) if out.is_dir() else [out]
    written = {str(pydicom.dcmread(f).SOPInstanceUID) for f in files}
    study = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    before = Snapshot(tmp_path)
    destination = "{}@{}:{}".format(*orthanc)
    for _ in range(2):
        result = run_meddiff("send", out, destination, "--timeout", "10")
        assert result.code == 0, result.err
        assert result.out.strip() == f"sent {len(files)} DICOM files to {destination}"
        assert written <= find_instances(orthanc, study)
    before.assert_unchanged()


def test_ctrl_c_while_sending_names_the_complete_output_and_the_send_command(workdir, monkeypatch):
    import meddiff.io.dicom_net as dicom_net

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dicom_net, "send_written", interrupted)
    out = workdir / "denoised"
    result = run_meddiff("denoise", "-i", get_testdata_file("MR_small.dcm"), "-o", out, "--format", "dcm",
                         "--send", "ORTHANC@127.0.0.1:4242")
    assert_clean_error(result, f"{out} is complete", f"meddiff send {out} ORTHANC@127.0.0.1:4242", code=130)
    assert len(list(out.glob("*.dcm"))) == 1
