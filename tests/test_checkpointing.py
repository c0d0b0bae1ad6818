"""Activation checkpointing (parallel/checkpointing.py) against the run without it: the same
losses and gradients (selective and full, every block and every 2nd; dense, dropout,
encoder-decoder, MoE with full), what the selective policy recomputes (counted aten ops in the
backward), the memory each mode keeps (measured by benchmarks/activation_memory.py's allocator
count) against the planner's Korthikanti figures, and a tensor-parallel run with selective
checkpointing against the single-process run without it."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (ROOT, cli_train, one_thread, parallel_overrides, read_losses, run_train,
                     tiny_model_config, tokens)
from llmtrain.config import Config, ConfigError, MoEConfig, load_config
from llmtrain.model.moe import _grouped_mm_works
from llmtrain.model.build import build_model
from llmtrain.parallel.checkpointing import apply_ac
from llmtrain.planner.memory import layer_activation_bytes

_spec = importlib.util.spec_from_file_location("activation_memory",
                                               ROOT / "benchmarks" / "activation_memory.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

aten = torch.ops.aten
VARIANTS = {
    "dense": {},
    "dropout": {"dropout": 0.1},  # the recompute must draw the same dropout masks
    "encoder_decoder": {"arch": "encoder_decoder", "n_encoder_layers": 2, "n_decoder_layers": 2},
    "moe": {"moe": MoEConfig(num_experts=4, top_k=2, router="topk")},
}
# (variant, mode, every)
CASES = [(v, mode, every) for v in VARIANTS for mode, every in
         (("selective", 1), ("selective", 2), ("full", 1), ("full", 2))]


def checkpointed(mode: str, every: int = 1, **model) -> torch.nn.Module:
    """The tiny model (seed 0, training mode) with `mode` applied every `every` blocks."""
    cfg = Config(model=tiny_model_config(**model))
    cfg.parallel.activation_checkpointing = mode
    cfg.parallel.activation_checkpointing_every = every
    torch.manual_seed(0)
    model = build_model(cfg.model)
    apply_ac(model, cfg)
    return model


def loss_of(model: torch.nn.Module) -> torch.Tensor:
    """Token-mean cross entropy of a fixed batch, through either model family."""
    x = tokens(2, 16)
    torch.manual_seed(1)  # dropout masks
    if model.cfg.arch == "encoder_decoder":
        logits = model(tokens(2, 12, seed=2), x)
    else:
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())


def loss_and_grads(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    loss = loss_of(model)
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant,mode,every", CASES)
def test_checkpointing_leaves_loss_and_gradients_unchanged(variant, mode, every):
    with one_thread():
        ref_loss, ref_grads = loss_and_grads(checkpointed("none", **VARIANTS[variant]))
        # MoE: the grouped-matmul probe (model/moe.py) runs again, inside the checkpointed forward
        _grouped_mm_works.cache_clear()
        loss, grads = loss_and_grads(checkpointed(mode, every, **VARIANTS[variant]))
    assert loss == ref_loss
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=0, atol=1e-6, msg=name)


class CountOps(TorchDispatchMode):
    """Counts the aten ops that run (by overload packet)."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def backward_ops(mode: str, every: int = 1) -> Counter:
    """The aten ops the backward of the tiny decoder runs: gradients, and under checkpointing
    the recomputed forward ops."""
    model = checkpointed(mode, every)
    loss = loss_of(model)
    with CountOps() as ops:
        loss.backward()
    return ops.counts


def test_selective_recomputes_the_cheap_ops_and_keeps_the_matmuls():
    with one_thread():
        none, sel, sel2, full = (backward_ops("none"), backward_ops("selective"),
                                 backward_ops("selective", 2), backward_ops("full"))
    n_blocks = 2
    linears = 7  # wq, wk, wv, wo, w1, w2, w3 per block: 2 matmuls each in the backward
    attention = aten._scaled_dot_product_flash_attention_for_cpu
    # the cheap forward ops: one silu (SwiGLU) and two rsqrt (RMSNorms) per recomputed block
    for ops, recomputed in ((none, 0), (sel2, 1), (sel, n_blocks), (full, n_blocks)):
        assert ops[aten.silu] == recomputed and ops[aten.rsqrt] == 2 * recomputed
    # selective keeps the matmul and attention outputs; full recomputes them, up to the last
    # tensor the backward needs (the recompute stops early): all but the block's last matmul, w2
    backward_mm = 2 * (linears * n_blocks + 1)  # + the output layer's
    assert none[aten.mm] == sel[aten.mm] == backward_mm
    assert full[aten.mm] == backward_mm + (linears - 1) * n_blocks
    assert none[attention] == sel[attention] == 0 and full[attention] == n_blocks
    total = {name: sum(c.values()) for name, c in
             (("none", none), ("sel2", sel2), ("sel", sel), ("full", full))}
    assert total["none"] < total["sel2"] < total["sel"] < total["full"]


# s, b, h, a of the memory test: large enough that a few KiB of bookkeeping do not matter
SHAPE = (128, 2, 128, 4)


def test_kept_activation_memory_orders_none_selective_full_and_full_meets_the_planner():
    s, b, h, a = SHAPE
    m = tiny_model_config(d_model=h, n_heads=a, max_seq_len=s)
    with one_thread():
        kept = {mode: bench.measure(m, mode, b, s, torch.device("cpu"))[0]
                for mode in ("none", "selective", "full")}
    plan = {mode: layer_activation_bytes(s, b, h, a, recompute=mode, ffn=m.ffn_dim, glu=True,
                                         dropout=False, layernorm=False, flash=True,
                                         elem_bytes=4)
            for mode in kept}
    assert kept["none"] > kept["selective"] > kept["full"]
    # full keeps each block's input, Korthikanti's 2sbh (x2 in fp32), and the CPU RNG state
    # the checkpoint restores to replay dropout
    rng_state = torch.get_rng_state().numel()
    assert kept["full"] == pytest.approx(plan["full"] + rng_state, rel=1e-3)
    # selective and none do not line up with the planner term by term: RMSNorm in fp32 and
    # RoPE keep intermediates the paper's accounting has no term for (measured 1.38x the
    # planner's none), and the planner's selective (the paper's: drop the s x s attention
    # scores) equals its none under a fused attention kernel, while the op-level policy also
    # drops the norms' and activations' outputs (measured 0.60 of none, see
    # docs/performance.md). Bounds around those measurements:
    assert 1.2 < kept["none"] / plan["none"] < 1.6
    assert 0.5 < kept["selective"] / kept["none"] < 0.7


def test_config_rules_of_activation_checkpointing():
    def load(**sets):
        return load_config(None, [f"{k}={v}" for k, v in sets.items()])

    load(**{"parallel.activation_checkpointing": "selective",
            "parallel.activation_checkpointing_every": 2, "model.n_layers": 2})
    with pytest.raises(ConfigError, match="activation_checkpointing_every=2 needs"):
        load(**{"parallel.activation_checkpointing_every": 2})
    with pytest.raises(ConfigError, match="activation_checkpointing_every=3 exceeds .* 2 blocks"):
        load(**{"parallel.activation_checkpointing": "full",
                "parallel.activation_checkpointing_every": 3, "model.n_layers": 2})
    with pytest.raises(ConfigError, match="activation_checkpointing_every"):
        load(**{"parallel.activation_checkpointing": "full",
                "parallel.activation_checkpointing_every": 0})


@pytest.mark.slow
def test_selective_under_tensor_parallel_matches_single_process(tmp_path):
    ref = tmp_path / "ref"
    assert cli_train(parallel_overrides(ref)) == 0
    run = tmp_path / "tp2"
    run_train(parallel_overrides(run, **{"parallel.tp": 2, "parallel.sequence_parallel": True,
                                         "parallel.activation_checkpointing": "selective"}),
              nproc=2)
    assert read_losses(run) == pytest.approx(read_losses(ref), rel=1e-5)
