"""Activation checkpointing: what each transformer block keeps for its backward pass.

`parallel.activation_checkpointing`:
  full       the block keeps only its input and reruns its whole forward in the backward
             (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost").
  selective  op-level: the block keeps the outputs of its matmuls, of the fused attention kernel
             and of the collectives, and recomputes everything else from them in the backward
             (norms, activations, rotary embeddings, residual adds, dropout). The expensive ops
             run once; the cheap ones, whose outputs are most of a block's activations, run
             twice. This is the idea of Korthikanti et al. 2022 ("Reducing Activation
             Recomputation in Large Transformer Models", Sec. 5: recompute what is cheap to
             recompute and large to store) applied per aten op with torch's selective
             checkpoint policy API, as torchtitan's op-level selective AC does. It differs from
             the paper's selective recomputation, which keeps everything except the attention
             core (softmax, its dropout, scores x V); docs/performance.md measures both.
`parallel.activation_checkpointing_every: N` checkpoints every N-th block only (blocks N-1,
2N-1, ... in the order `transformer_blocks` lists them), in the mode chosen; the blocks between
keep all their activations (torchtitan's layer-level selective AC when the mode is full).

Each chosen block's forward is wrapped in place, so parameter names (FQNs), and with them
checkpoints, are unchanged; `parallelize()` applies it before the pipeline split, tensor, expert
and data parallelism, which then wrap or shard the same blocks.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                    create_selective_checkpoint_contexts)

from llmtrain.config import Config
from llmtrain.parallel.data import transformer_blocks

_aten, _funcol = torch.ops.aten, torch.ops._c10d_functional

# The ops whose outputs selective checkpointing keeps, by overload packet. nn.Linear and
# torch.matmul are not here: they decompose into mm / addmm / bmm before a dispatch mode (and so
# the policy) sees them. Collective outputs are kept so that the recompute does not talk to other
# ranks a second time (the tensor and sequence parallel all-reduces and all-gathers).
SAVED_OPS = frozenset({
    _aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten._grouped_mm, _aten._scaled_mm,
    _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu,
    _aten._scaled_dot_product_efficient_attention,
    _aten._scaled_dot_product_cudnn_attention,
    _aten._scaled_dot_product_fused_attention_overrideable,
    _funcol.all_reduce, _funcol.all_gather_into_tensor, _funcol.reduce_scatter_tensor,
    _funcol.all_to_all_single,
})


def save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective policy: keep what SAVED_OPS lists, recompute every other op."""
    if op.overloadpacket in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpointed_blocks(model: nn.Module, every: int) -> list[nn.Module]:
    """Every `every`-th block of `model` (blocks every-1, 2*every-1, ...): the ones
    `activation_checkpointing_every` checkpoints."""
    return [b for i, b in enumerate(transformer_blocks(model)) if (i + 1) % every == 0]


def apply_ac(model: nn.Module, cfg: Config) -> None:
    """Wrap the forward of each block `parallel.activation_checkpointing_every` picks in a
    non-reentrant checkpoint, selective (the `save_matmuls` policy) or full."""
    mode = cfg.parallel.activation_checkpointing
    if mode == "none":
        return
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        # a fresh pair of (forward, recompute) contexts for every call: the cache they share
        # holds one forward's kept outputs until its backward
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                 save_matmuls)
    for block in checkpointed_blocks(model, cfg.parallel.activation_checkpointing_every):
        block.forward = functools.partial(checkpoint, block.forward, **kwargs)
