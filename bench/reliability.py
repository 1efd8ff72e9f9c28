"""Run the reliability corpus and print RELIABILITY.md's results table: cases, passed, failed per area.

    python bench/reliability.py            # the corpus as `make test` runs it (short fuzz budget)
    MEDDIFF_FUZZ_EXAMPLES=2000 python bench/reliability.py   # with a long fuzz budget

An area is one test file of tests/reliability/; its module docstring's first sentence says what it covers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "reliability"


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", str(CORPUS), f"--junitxml={report}"],
                       check=False)
        cases = ET.parse(report).getroot().iter("testcase")
        counts: dict[str, Counter] = {}
        for case in cases:
            area = case.get("classname", "").split(".")[-1]
            outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else (
                "skipped" if case.find("skipped") is not None else "passed")
            counts.setdefault(area, Counter())[outcome] += 1
    print("| area (tests/reliability/) | what it covers | cases | clean | failed | skipped |")
    print("|---|---|---|---|---|---|")
    total = Counter()
    for area in sorted(counts):
        doc = ast.get_docstring(ast.parse((CORPUS / f"{area}.py").read_text())) or ""
        c = counts[area]
        total.update(c)
        summary = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")  # the docstring's first sentence
        print(f"| `{area}.py` | {summary} | {sum(c.values())} | {c['passed']} | {c['failed']} | {c['skipped']} |")
    print(f"| **all** | | **{sum(total.values())}** | **{total['passed']}** | **{total['failed']}** | "
          f"**{total['skipped']}** |")
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
