"""Shared fixtures. The plain functions the tests share are in helpers.py; importing it first
points LLMTRAIN_CACHE at the corpus cache every test in the session shares. The session also
starts the fork server (fork_ranks.py) the tests' llmtrain subprocesses are forked from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import FORK_RANKS, subprocess_env, tiny_overrides

_SERVER: dict = {}


def pytest_configure(config):
    """Torch on one intra-op thread in this process, as in the subprocesses (subprocess_env):
    the in-process runs are tiny and only wait on a second thread (the seq2seq run's 100 steps
    took 15-45 s on one thread, 165 s and more on two, on the shared 2-core machine). Then start
    the fork server, in the environment the tests' subprocesses get; the commands of
    fork_ranks.py find it through LLMTRAIN_FORK_SERVER (until it is ready, and without it, they
    import llmtrain themselves)."""
    torch.set_num_threads(1)
    if os.environ.get("LLMTRAIN_FORK_SERVER") or not hasattr(os, "fork"):
        return
    folder = Path(tempfile.mkdtemp(prefix="llmtrain-fork-"))
    path = str(folder / "server.sock")
    _SERVER.update(folder=folder, proc=subprocess.Popen(
        [sys.executable, str(FORK_RANKS), "--serve", path], env=subprocess_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
    os.environ["LLMTRAIN_FORK_SERVER"] = path


def pytest_unconfigure(config):
    if _SERVER:
        _SERVER["proc"].kill()
        _SERVER["proc"].wait()
        shutil.rmtree(_SERVER["folder"], ignore_errors=True)
        os.environ.pop("LLMTRAIN_FORK_SERVER", None)


@pytest.fixture
def tiny(tmp_path):
    """tiny_overrides for this test's run directory tmp_path / "run"."""
    return lambda **extra: tiny_overrides(tmp_path / "run", **extra)
