"""Shared fixtures: a tiny config, a corpus cache shared by every test in the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One BPE tokenizer + indexed corpus for the whole test session (built once, ~15 s).
_CACHE = Path(os.environ.get("LLMTRAIN_TEST_CACHE", Path(__file__).parent.parent / ".cache-test"))
os.environ.setdefault("LLMTRAIN_CACHE", str(_CACHE))


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """A model and run small enough for a test to train a few steps in seconds."""
    base = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.vocab_size": 1024,
            "model.max_seq_len": 64, "train.seq_len": 32, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.steps": 6, "train.eval_every": 0,
            "train.eval_steps": 2, "train.log_every": 1, "optim.warmup_steps": 2,
            "logging.run_dir": str(run_dir), "logging.tensorboard": False,
            "logging.progress": False, "checkpoint.every": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny(tmp_path):
    return lambda **extra: tiny_overrides(tmp_path / "run", **extra)
