"""Command lines argparse cannot parse: one ``error:`` line naming the help to read, exit 2, nothing written."""

from __future__ import annotations

import pytest
from harness import Snapshot, assert_clean_error, run_meddiff

CASES = {
    "no verb": ([], "required"),
    "unknown verb": (["denoize", "-i", "a.nii.gz"], "invalid choice"),
    "unknown option": (["info", "a.nii.gz", "--bogus"], "unrecognized arguments"),
    "info without a path": (["info"], "required"),
    "manifest without an action": (["manifest"], "required"),
    "manifest unknown action": (["manifest", "rebuild", "x"], "invalid choice"),
    "generate -n two": (["generate", "--model", "m", "-n", "two", "-o", "out"], "invalid int value"),
    "generate bad --format": (["generate", "--model", "m", "-n", "2", "-o", "out", "--format", "gif"],
                              "invalid choice"),
    "generate without -o": (["generate", "--model", "m", "-n", "2"], "required"),
    "generate --prompt and --prompts": (["generate", "--model", "m", "-o", "o", "--prompt", "a",
                                         "--prompts", "p.jsonl"], "not allowed with"),
    "denoise without -i": (["denoise", "-o", "out.nii.gz"], "required"),
    "denoise --steps one": (["denoise", "-i", "a", "-o", "b", "--steps", "one"], "invalid int value"),
    "evaluate --plane oblique": (["evaluate", "--real", "a", "--fake", "b", "--plane", "oblique"], "invalid choice"),
    "evaluate -k 1.5": (["evaluate", "--real", "a", "--fake", "b", "-k", "1.5"], "invalid int value"),
    "manifest build --split-by site": (["manifest", "build", "d", "-o", "m.jsonl", "--split-by", "site"],
                                       "invalid choice"),
    "export without output": (["export", "last.ckpt"], "required"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unparsable_command_lines_end_in_one_error_line(case, workdir):
    argv, fragment = CASES[case]
    before = Snapshot(workdir)
    line = assert_clean_error(run_meddiff(*argv), fragment, "--help")
    assert "usage:" not in line
    before.assert_unchanged()
