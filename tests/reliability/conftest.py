"""Fixtures of the reliability corpus; the helpers themselves live in ``harness.py``
(a name no other conftest shadows)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, importable by the corpus' modules

from harness import tiny_model_dir  # noqa: E402


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty folder that is also the current directory (as a user's shell would be)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """An unconditional 2D MR model folder, shared by the whole corpus (read-only: never write into it)."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")
