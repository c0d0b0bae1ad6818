"""The loss-spike detector against its definition (z-score over a trailing window)."""

from __future__ import annotations

import math

from llmtrain.train.guards import SpikeDetector


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
