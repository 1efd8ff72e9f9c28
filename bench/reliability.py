"""Run the reliability corpus and print RELIABILITY.md's results table: cases, passed, failed per area.

    python -m bench.reliability            # the corpus as `make test` runs it (short fuzz budget)
    MEDDIFF_FUZZ_EXAMPLES=2000 python -m bench.reliability   # with a long fuzz budget

An area is one test file of tests/reliability/; its module docstring's first sentence says what it covers. The
counts also go to the JSON record (``--out``); the exit status is 1 when a case failed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

from bench import harness

CORPUS = harness.ROOT / "tests" / "reliability"
OUTCOMES = ("passed", "failed", "skipped")


def options() -> argparse.ArgumentParser:
    return harness.parser(__doc__, out=harness.results_file("reliability"))


def run(args: argparse.Namespace) -> int:
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
    areas = {}
    for area in sorted(counts):
        doc = ast.get_docstring(ast.parse((CORPUS / f"{area}.py").read_text())) or ""
        c = counts[area]
        total.update(c)
        summary = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")  # the docstring's first sentence
        print(f"| `{area}.py` | {summary} | {sum(c.values())} | {c['passed']} | {c['failed']} | {c['skipped']} |")
        areas[area] = {"covers": summary, "cases": sum(c.values()), **{outcome: c[outcome] for outcome in OUTCOMES}}
    print(f"| **all** | | **{sum(total.values())}** | **{total['passed']}** | **{total['failed']}** | "
          f"**{total['skipped']}** |")
    everything = {"cases": sum(total.values()), **{outcome: total[outcome] for outcome in OUTCOMES}}
    harness.write_result("reliability", args, {"areas": areas, "all": everything}, args.out)
    return 1 if total["failed"] else 0


if __name__ == "__main__":
    harness.main(run, options)
