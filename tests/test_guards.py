"""The loss-spike detector against its definition (z-score over a trailing window)."""

from __future__ import annotations

import math
import os
import signal

import pytest

from llmtrain.train import guards
from llmtrain.train.guards import SpikeDetector, StopSignal


def test_spike_is_flagged_with_its_z_score_and_kept_out_of_the_window():
    d = SpikeDetector(window=20, z_threshold=6.0, min_history=20)
    history = [3.0 + 0.01 * ((i % 5) - 2) for i in range(20)]
    assert all(d.update(x) is None for x in history)
    mean = sum(history) / 20
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / 20)
    z = d.update(3.5)
    assert z is not None and abs(z - (3.5 - mean) / std) < 1e-9
    assert d.update(3.5) is not None, "the spike did not enter the window"
    assert d.update(3.01) is None
    assert d.update(float("nan")) is None


def test_no_verdict_before_enough_history():
    d = SpikeDetector(window=50, min_history=20)
    assert all(d.update(x) is None for x in [1.0] * 10 + [100.0])


def test_ctrl_c_stops_after_the_step_and_a_second_one_aborts(monkeypatch):
    """The first SIGINT is recorded (the loop checkpoints after the step) with one line saying
    so; a SIGTERM after it changes nothing; a second SIGINT raises KeyboardInterrupt at once, as
    does a SIGINT after a SIGTERM. The handlers found are put back (in CI SIGINT may be
    inherited ignored)."""
    armed, said = [], []
    monkeypatch.setattr(guards.HangWatchdog, "arm", lambda self: armed.append(self.timeout_s))
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop = StopSignal(grace_s=5.0, say=said.append)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == "SIGINT" and armed == [5.0]
        assert said == ["interrupted: finishing this step and writing a checkpoint; Ctrl-C "
                        "again aborts without one"]
        os.kill(os.getpid(), signal.SIGTERM)  # a launcher may follow a Ctrl-C with it
        assert stop.requested == "SIGINT" and len(said) == 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert {sig: signal.getsignal(sig) for sig in before} == before
    stop = StopSignal(grace_s=5.0, say=said.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested == "SIGTERM" and len(said) == 1  # SIGTERM says nothing itself
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
