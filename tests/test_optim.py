"""LR schedules at warmup start, end of warmup and end of decay; parameter groups; the AdamW
kernel (fused, foreach) chosen for a device and its parameters."""

from __future__ import annotations

import math

import pytest
import torch

from llmtrain.config import OptimConfig
from llmtrain.train.optim import (adamw_kernel, kernel_name, lr_at, param_groups,
                                  params_device_type, split_by_kind)

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


def _groups(*params):
    return [{"params": list(params), "weight_decay": 0.1, "name": "decay"}]


def test_adamw_kernel_is_fused_on_cuda_and_foreach_elsewhere():
    floats = _groups(torch.zeros(2, 2), torch.zeros(3))
    assert adamw_kernel("cuda", floats) == {"fused": True}
    assert adamw_kernel("cpu", floats) == {"foreach": True}
    # the fused kernel takes floating-point parameters only
    assert adamw_kernel("cuda", _groups(torch.zeros(2), torch.zeros(2, dtype=torch.long))) \
        == {"foreach": True}
    assert adamw_kernel("mixed", floats) == {"foreach": False}  # several devices
    assert params_device_type(floats) == "cpu"
    assert params_device_type(_groups(torch.zeros(2), torch.zeros(2, device="meta"))) == "mixed"


def test_foreach_step_equals_the_plain_step_and_groups_split_by_kind():
    """AdamW with foreach=True (what the CPU runs get) steps the weights bit for bit as the
    per-parameter loop; groups mixing tensors and DTensors of two meshes are split into one
    group per kind, which the foreach kernels then step (they cannot mix kinds)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    weights = {}
    for foreach in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
        opt = torch.optim.AdamW(_groups(*params), lr=0.1, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        weights[foreach] = [p.detach().clone() for p in params]
        assert kernel_name(opt) == ("foreach" if foreach else "for-loop")
    assert all(torch.equal(a, b) for a, b in zip(weights[False], weights[True]))

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        tp = init_device_mesh("cpu", (1,), mesh_dim_names=("tp",))
        ep = init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
        plain = torch.nn.Parameter(torch.randn(3))
        on_tp, on_ep = (torch.nn.Parameter(distribute_tensor(torch.randn(2, 2), m, [Replicate()]))
                        for m in (tp, ep))
        groups = split_by_kind(_groups(plain, on_tp, on_ep))
        assert [(g["name"], g["params"]) for g in groups] == [
            ("decay", [plain]), ("decay_tp", [on_tp]), ("decay_ep", [on_ep])]
        assert [g["name"] for g in split_by_kind(_groups(on_tp))] == ["decay"]  # one kind
        kernel = adamw_kernel("cpu", groups)
        opt = torch.optim.AdamW(groups, lr=0.1, **kernel)
        for p in (plain, on_tp, on_ep):
            p.grad = torch.ones_like(p)
        opt.step()
        assert kernel == {"foreach": True} and (on_ep.to_local() < 1e9).all()
    finally:
        dist.destroy_process_group()
