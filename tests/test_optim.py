"""LR schedules at warmup start, end of warmup and end of decay; parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.config import OptimConfig
from llmtrain.train.optim import lr_at, param_groups

T = 100


def opt(**kw):
    return OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, **kw)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "inverse_sqrt", "wsd"])
def test_warmup_is_linear_from_zero(schedule):
    o = opt(schedule=schedule)
    assert lr_at(0, o, T) == pytest.approx(0.1)       # (0 + 1) / 10
    assert lr_at(4, o, T) == pytest.approx(0.5)
    assert lr_at(9, o, T) == pytest.approx(1.0)       # last warmup step reaches lr


def test_cosine_and_linear_end_at_min_lr():
    for schedule in ("cosine", "linear"):
        o = opt(schedule=schedule)
        assert lr_at(T - 1, o, T) == pytest.approx(0.1)
        assert lr_at(T + 50, o, T) == pytest.approx(0.1)
    o = opt(schedule="cosine")
    mid = 10 + 45 - 1  # half way through the 90 decay steps
    assert lr_at(mid, o, T) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    o = opt(schedule="linear", decay_steps=40)
    assert lr_at(10 + 40 - 1, o, T) == pytest.approx(0.1)
    assert lr_at(10 + 20 - 1, o, T) == pytest.approx(0.55)


def test_constant_inverse_sqrt_wsd():
    assert lr_at(T - 1, opt(schedule="constant"), T) == 1.0
    o = opt(schedule="inverse_sqrt")
    assert lr_at(39, o, T) == pytest.approx(math.sqrt(10 / 40))
    assert lr_at(10_000, o, T) == pytest.approx(0.1)  # floored at min_lr
    o = opt(schedule="wsd", decay_steps=20)
    assert lr_at(79, o, T) == 1.0                      # stable until the last 20 steps
    assert lr_at(89, o, T) == pytest.approx(0.55)
    assert lr_at(99, o, T) == pytest.approx(0.1)


def test_noam_is_the_2017_formula():
    o = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=4000, schedule="noam")
    d = 512
    for step in (0, 3999, 4000, 100_000):
        s = step + 1
        assert lr_at(step, o, 10**6, d) == pytest.approx(d ** -0.5 * min(s ** -0.5, s * 4000 ** -1.5))
    peak = lr_at(3999, o, 10**6, d)
    assert peak == pytest.approx(d ** -0.5 * 4000 ** -0.5)


def test_no_weight_decay_on_norms_biases_embeddings():
    m = torch.nn.ModuleDict({"tok_embeddings": torch.nn.Embedding(10, 4),
                             "proj": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4)})
    decay, no_decay = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
