"""Shared fixtures. The plain functions the tests share are in helpers.py; importing it first
points LLMTRAIN_CACHE at the corpus cache every test in the session shares."""

from __future__ import annotations

import pytest

from helpers import tiny_overrides


@pytest.fixture
def tiny(tmp_path):
    """tiny_overrides for this test's run directory tmp_path / "run"."""
    return lambda **extra: tiny_overrides(tmp_path / "run", **extra)
