"""Overlapped gradient reduction (parallel/data.py `GradReducer`) on 2 gloo ranks forked by
fork_ranks.py: the first bucket's all-reduce is launched while the backward still has the first
layer to run, the earlier micro-batch of an accumulation launches nothing, every rank launches
the same buckets in the same order, and the gradients equal a plain per-tensor all-reduce mean
after the backward bit for bit (a parameter no batch reached included, as zero).

This file is also the ranks' script: `fork_ranks.py 2 --call tests/test_overlap.py OUT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers import run_command

FORK_RANKS = Path(__file__).with_name("fork_ranks.py")
# 4 KiB buckets: the 2-layer d_model 32 model below fills about 20 of them
BUCKET_BYTES = 4096


def test_first_bucket_is_reduced_during_the_backward(tmp_path):
    run_command([sys.executable, str(FORK_RANKS), "2", "--call", __file__, str(tmp_path)],
                timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        events = rank["events"]
        last = events.index("last micro-batch")
        assert "launch" not in events[:last]  # the earlier micro-batch only accumulates
        assert "layer 0 grad" in events[:last]  # (whose backward did run)
        events = events[last:]
        first_launch, layer0 = events.index("launch"), events.index("layer 0 grad")
        assert first_launch < layer0, events  # reduced while the backward was still running
        assert events.count("launch") == rank["n_buckets"] > 2
        assert events[-1] == "launch"  # the unused parameter's bucket waits for finish()
        assert rank["equal"] == []
    assert ranks[0]["launched"] == ranks[1]["launched"]  # same buckets, same order


def _rank(out: str) -> None:
    """One rank: 2 micro-batches of its own tokens through a tiny decoder, the last one's
    reductions overlapped; then the same backward on a copy, reduced tensor by tensor."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from llmtrain.config import load_config
    from llmtrain.model import build_model
    from llmtrain.parallel.data import GradReducer

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=32", "model.n_heads=4",
                             "model.vocab_size=97"])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = build_model(cfg.model)
        # a parameter no forward reaches: zero-filled and reduced, in the last bucket
        m.layers["0"].register_parameter("unused", nn.Parameter(torch.ones(3)))
        models.append(m)
    model, ref = models
    group = dist.group.WORLD
    reducer = GradReducer([(list(model.parameters()), group, 2)], list(model.parameters()),
                          bucket_bytes=BUCKET_BYTES)
    events, launched = [], []
    all_reduce = dist.all_reduce

    def recording_all_reduce(t, *args, **kw):
        events.append("launch")
        launched.append(t.numel())
        return all_reduce(t, *args, **kw)
    dist.all_reduce = recording_all_reduce
    for p in model.layers["0"].parameters():  # the layer whose gradients come last
        p.register_post_accumulate_grad_hook(lambda p: events.append("layer 0 grad"))

    g = torch.Generator().manual_seed(1 + rank)  # each rank its own tokens
    micro = [torch.randint(0, 97, (2, 9), generator=g) for _ in range(2)]

    def loss(m, tokens):
        logits = m(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    for i, tokens in enumerate(micro):
        if i == len(micro) - 1:
            events.append("last micro-batch")
            reducer.arm()
        loss(model, tokens).backward()
    reducer.finish()
    dist.all_reduce = all_reduce

    for tokens in micro:
        loss(ref, tokens).backward()
    equal = []  # the names of the gradients that differ
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        expected = torch.zeros_like(q) if q.grad is None else q.grad.clone()
        dist.all_reduce(expected, group=group)
        if not torch.equal(p.grad, expected / 2):
            equal.append(name)
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"events": events, "launched": launched, "n_buckets": len(reducer.buckets),
         "equal": equal}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(sys.argv[1])
