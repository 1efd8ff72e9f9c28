"""Paths to the real medical images that installed packages ship (see DESIGN.md)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom.data
import pytest

os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core: more threads per worker oversubscribe the cores and slow runs tenfold
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _pydicom_data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


PYDICOM_TEST_FILES = Path(pydicom.data.get_testdata_file("CT_small.dcm")).parent
DICOMDIR_TESTS = PYDICOM_TEST_FILES / "dicomdirtests"


@pytest.fixture(scope="session")
def ct_series_dir() -> Path:
    """A real 5-slice CT series (2.5 mm apart) with nothing else in its folder."""
    return DICOMDIR_TESTS / "98892001" / "CT5N"


@pytest.fixture(scope="session")
def multi_series_dir() -> Path:
    """A real study folder with three CR series and one (unevenly spaced) CT series."""
    return DICOMDIR_TESTS / "77654033"


@pytest.fixture(scope="session")
def clinical_dicom() -> Path:
    """Clinical-size DICOM from pydicom-data (I/O tests and evaluation only)."""
    return _pydicom_data_dir()


@pytest.fixture(scope="session")
def mni_t1() -> Path:
    import nilearn.datasets

    return Path(nilearn.datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="session")
def dipy_oblique() -> Path:
    """dipy's aniso_vox: a real brain volume with an oblique, anisotropic affine."""
    from dipy.data import get_fnames

    return Path(get_fnames(name="aniso_vox"))


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory) -> Path:
    """A subset of the offline sample set written once per session (train MRI, val slice, test CT)."""
    from meddiff.data.samples import write_samples

    out = tmp_path_factory.mktemp("samples")
    write_samples(out, names=["dipy_aniso_vox", "dipy_small_64d_b0", "dipy_t1_coronal_slice", "head_ct"])
    return out


def write_radimagenet_weights(path: Path) -> Path:
    """A random ResNet-50 state dict laid out as RadImageNet's PyTorch release saves it (nn.Sequential
    'backbone.N' keys)."""
    import torch

    from meddiff.metrics.features import _RADIMAGENET_CHILDREN, medicalnet_resnet

    torch.manual_seed(0)
    names = {v: k for k, v in _RADIMAGENET_CHILDREN.items()}
    state = {}
    for key, value in medicalnet_resnet(50, 2, n_input_channels=3).state_dict().items():
        child, _, rest = key.partition(".")
        state[f"backbone.{names[child]}.{rest}"] = value
    torch.save(state, path)
    return path


ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A local Orthanc PACS with a temporary storage folder: (AE title, host, DICOM port)."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    root = tmp_path_factory.mktemp("orthanc")
    port = _free_port()
    config = {"Name": "meddiff-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
              "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": _free_port(), "HttpServerEnabled": False,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
              "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
              "DicomAlwaysAllowGet": True, "DicomCheckModalityHost": False, "Plugins": []}
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    process = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    ae = AE("MEDDIFF")
    ae.add_requested_context(Verification)
    for _ in range(100):
        association = ae.associate("127.0.0.1", port, ae_title="ORTHANC")
        if association.is_established:
            association.release()
            break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"Orthanc did not answer: {(root / 'orthanc.log').read_text()[-2000:]}")
    yield "ORTHANC", "127.0.0.1", port
    process.terminate()
    process.wait(timeout=30)
    log.close()
