"""Real radiology report texts that work offline: the Indiana University chest X-ray reports (OpenI).

torchxrayvision ships them as ``data/NLMCXR_reports.tgz`` (3,955 de-identified XML reports; CC
BY-NC-ND 4.0), installed with meddiff's dev extra. Only the package's data file is read, found without
importing the package. Used to test and time text encoders at scale;
only FINDINGS and IMPRESSION are kept (no indication, dates or identifiers).
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from meddiff.errors import MeddiffError

SECTIONS = ("FINDINGS", "IMPRESSION")


def openi_reports_file() -> Path:
    """Where torchxrayvision's package data keeps the report archive (found without importing it)."""
    spec = importlib.util.find_spec("torchxrayvision")
    path = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise MeddiffError("the OpenI chest X-ray reports come with torchxrayvision's package data: "
                           "pip install torchxrayvision")
    return path


def openi_reports(path: str | Path | None = None) -> list[str]:
    """One string per report, 'FINDINGS. IMPRESSION', in archive order; '' where both are missing."""
    reports = []
    with tarfile.open(path or openi_reports_file(), "r:gz") as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            root = ElementTree.parse(archive.extractfile(member)).getroot()
            parts = {t.get("Label"): (t.text or "").strip() for t in root.iter("AbstractText")}
            reports.append(" ".join(parts[s] for s in SECTIONS if parts.get(s)))
    return reports
