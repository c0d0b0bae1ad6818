"""Sharded initialisation (model/init.py, parallel/init.py): the model is sharded on the meta
device and each rank materialises and initialises only its shards, with the values the
single-process model has, at every layout."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from helpers import as_overrides, run_command
from llmtrain.config import ModelConfig
from llmtrain.model import build_model
from llmtrain.model.init import fill_box, layout_free_init, normals, stream_key, uniforms

FORK_RANKS = __import__("pathlib").Path(__file__).with_name("fork_ranks.py")
SCRIPT = FORK_RANKS.with_name("initial_weights.py")

# square attention matrices of 128 x 128 are the smallest full weights; every other weight's
# quarter (dp 4) is smaller than that, so "never allocates a full matrix" has one threshold
MODEL = {"model.n_layers": 2, "model.d_model": 128, "model.n_heads": 4, "model.vocab_size": 256,
         "model.max_seq_len": 64, "train.seq_len": 32, "train.global_batch_size": 8,
         "train.micro_batch_size": 2}
MOE = {"model.moe.num_experts": 4, "model.moe.router": "topk", "model.moe.top_k": 2}


def test_any_box_of_a_tensor_is_the_same_slice_of_the_whole_one():
    rng = random.Random(0)
    for draw in (normals, uniforms):
        for shape in [(7,), (5, 6), (3, 4, 5), (2, 3, 2, 4)]:
            key = stream_key(1, f"w{shape}")
            full = torch.empty(shape, dtype=torch.float64)
            fill_box(full, shape, (0,) * len(shape), key, draw)
            for _ in range(40):
                offset = tuple(rng.randrange(s) for s in shape)
                box = tuple(rng.randrange(1, s - o + 1) for s, o in zip(shape, offset))
                local = torch.empty(box, dtype=torch.float64)
                fill_box(local, shape, offset, key, draw)
                assert torch.equal(local, full[tuple(slice(o, o + b)
                                                     for o, b in zip(offset, box))])


def test_draws_have_the_distributions_init_weights_asks_for():
    key = stream_key(0, "x")
    z = torch.from_numpy(normals(key, 0, 400_000))
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    u = torch.from_numpy(uniforms(key, 0, 400_000))
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    # each parameter has its own stream, and the seed changes all of them
    assert not torch.equal(torch.from_numpy(normals(stream_key(0, "y"), 0, 10)), z[:10])
    assert not torch.equal(torch.from_numpy(normals(stream_key(1, "x"), 0, 10)), z[:10])


def test_build_model_is_a_function_of_the_seed():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=512, max_seq_len=32)
    a, b, c = (build_model(cfg, seed=s).state_dict() for s in (3, 3, 4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tok_embeddings.weight"], c["tok_embeddings.weight"])
    std = float(a["tok_embeddings.weight"].std())
    assert abs(std - cfg.init_std) < 0.05 * cfg.init_std
    assert torch.equal(a["norm.weight"], torch.ones(64))


def test_an_init_op_it_cannot_reproduce_is_an_error():
    class Orthogonal(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))

        def init_weights(self):
            nn.init.orthogonal_(self.w)  # a QR of the whole matrix: no shard can draw its part

    with pytest.raises(RuntimeError, match=r"init of w calls \w+_, which the layout-independ"):
        layout_free_init(Orthogonal(), 0)


def initial_weights(tmp_path, name: str, nproc: int, **sets) -> list[dict]:
    """Each rank's record (initial_weights.py) of the layout `sets` on `nproc` ranks."""
    out = tmp_path / name
    out.mkdir()
    run_command(["python", str(FORK_RANKS), str(nproc), "--call", str(SCRIPT), str(out),
                 *as_overrides({**MODEL, **sets})], timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def merged(records: list[dict]) -> dict[str, torch.Tensor]:
    """The whole model from every rank's full-shape parameters (pipeline ranks hold different
    layers; ranks holding the same parameter must agree)."""
    whole: dict[str, torch.Tensor] = {}
    for rec in records:
        for k, v in rec["weights"].items():
            assert k not in whole or torch.equal(whole[k], v), k
            whole[k] = v
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("name,nproc,sets", [
    ("dp4-zero3", 4, {"parallel.zero_stage": 3}),
    ("tp2xdp2-zero3", 4, {"parallel.tp": 2, "parallel.zero_stage": 3}),
    ("tp2-zero1", 2, {"parallel.tp": 2, "parallel.zero_stage": 1}),
    ("pp2", 2, {"parallel.pp": 2, "model.tie_embeddings": False}),
    ("ep2-moe", 2, {**MOE, "parallel.ep": 2}),
])
def test_every_layout_starts_from_the_single_process_weights(tmp_path, name, nproc, sets):
    model = {k: v for k, v in sets.items() if k.startswith("model.")}
    reference = merged(initial_weights(tmp_path, "single", 1, **model))
    records = initial_weights(tmp_path, name, nproc, **sets)
    weights = merged(records)
    assert weights.keys() == reference.keys()
    for k in reference:
        assert torch.equal(weights[k], reference[k]), k
    if name == "dp4-zero3":
        # no rank allocated a tensor as large as a full weight matrix it keeps a quarter of
        smallest = min(v.numel() for v in reference.values() if v.dim() == 2)
        assert smallest == 128 * 128
        largest = max(r["largest_allocation"] for r in records)
        assert largest < smallest, (largest, smallest)
        single = initial_weights(tmp_path, "single-alloc", 1)[0]["largest_allocation"]
        assert single >= max(v.numel() for v in reference.values())
