"""Context parallelism by all-to-all (DeepSpeed-Ulysses, Jacobs et al. 2023, arXiv:2309.14509).

Each of the `cp` ranks of a group holds a contiguous 1/cp of every sequence for the whole block:
embeddings, norms, MLPs and the q/k/v/o projections are per-token and run on the local tokens
only. Attention is the one part that reads other positions (`Attention.core`, a
`ScaledDotProduct`); `ContextParallelCore` wraps it:

  q, k, v [B, H, T/cp, hd]  --all-to-all-->  [B, H/cp, T, hd]   (sequence-sharded -> head-sharded)
  the inner ScaledDotProduct over the whole sequence, in order, for this rank's H/cp heads
  y [B, H/cp, T, hd]        --all-to-all-->  [B, H, T/cp, hd]   (back)

The inner core sees the whole sequence in its original order, so the plain causal mask (and the
block-diagonal document mask, built by the model over the whole sequence from `doc_ids`) applies
unchanged. The all-to-all is torch's functional `all_to_all_single_autograd` (as in
parallel/expert.py), differentiable: its backward is the reverse all-to-all.

Load balance (issue 24 item 2): none is needed. Ring attention keeps the queries sequence-sharded,
so under a causal mask the rank holding the first 1/cp of the sequence skips most key blocks and
the last one skips none, hence ring CP's head-tail (zig-zag) split. Here every rank computes
attention for all T queries of H/cp heads: the same causal triangle, the same work, on every rank.

Grouped-query attention: rank r gets query heads [r H/cp, (r+1) H/cp). Where the key/value heads
divide into cp groups each rank gets its H_kv/cp of them, exactly those its query heads read
(query head h reads kv head h // (H/H_kv), as `ScaledDotProduct`'s enable_gqa and Hugging Face's
repeat_kv). Otherwise (H_kv < cp, e.g. MQA) each kv head is first repeated
lcm(H_kv, cp)/H_kv times in place (repeat_interleave, the repeat_kv order), which keeps that
mapping and makes the kv heads divisible by cp.

Counting: `ContextParallelCore.sent_bytes` adds up what this rank's all-to-alls send to other
ranks in the forward (benchmarks/context_parallel.py compares it with planner/comm.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from llmtrain.model.attention import Attention


def _all_to_all(x: torch.Tensor, group, core: ContextParallelCore) -> torch.Tensor:
    """Exchange the cp chunks of dim 0 of `x` (contiguous, [cp, ...]): chunk j goes to rank j."""
    cp = x.shape[0]
    core.sent_bytes += x.numel() * x.element_size() * (cp - 1) // cp
    y = all_to_all_single_autograd(x, None, None, group)
    return torch.ops._c10d_functional.wait_tensor(y)


def seq_to_heads(x: torch.Tensor, cp: int, group, core) -> torch.Tensor:
    """[B, H, T/cp, hd] (this rank's tokens, all heads) -> [B, H/cp, T, hd] (all tokens, this
    rank's heads)."""
    B, H, t, hd = x.shape
    chunks = x.reshape(B, cp, H // cp, t, hd).transpose(0, 1).contiguous()
    y = _all_to_all(chunks, group, core)  # [cp (sequence chunk j), B, H/cp, T/cp, hd]
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // cp, cp * t, hd)


def heads_to_seq(y: torch.Tensor, cp: int, group, core) -> torch.Tensor:
    """The inverse of `seq_to_heads`: [B, H/cp, T, hd] -> [B, H, T/cp, hd], laid out in memory
    as [B, T/cp, H, hd] (as SDPA lays out its output), so that Attention's transpose and reshape
    before `wo` is a view, not one more copy. `wo` keeps this tensor for its backward and the
    inner core keeps its head-sharded output: one [T/cp, d_model] per layer more than one
    process keeps, where both are one tensor (+4.7% measured, benchmarks/context_parallel.py)."""
    B, h, T, hd = y.shape
    chunks = y.reshape(B, h, cp, T // cp, hd).permute(2, 0, 1, 3, 4).contiguous()
    x = _all_to_all(chunks, group, core)  # [cp (head group j), B, H/cp, T/cp, hd]
    return x.permute(1, 3, 0, 2, 4).reshape(B, T // cp, cp * h, hd).transpose(1, 2)


class ContextParallelCore(nn.Module):
    """`inner` (a ScaledDotProduct) on a sequence split over the ranks of `group` (see the module
    docstring). Same call as the inner core: q [B, H, T/cp, hd], k/v [B, H_kv, T/cp, hd], mask
    [B, 1, T, T] over the whole sequence or None (causal)."""

    def __init__(self, inner: nn.Module, group, cp: int):
        super().__init__()
        self.inner, self.group, self.cp = inner, group, cp
        self.sent_bytes = 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        cp, group = self.cp, self.group
        n_kv = k.shape[1]
        if n_kv % cp:  # repeat each kv head in place up to lcm(H_kv, cp) heads
            rep = math.lcm(n_kv, cp) // n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        q, k, v = (seq_to_heads(t, cp, group, self) for t in (q, k, v))
        return heads_to_seq(self.inner(q, k, v, mask), cp, group, self)


def attention_modules(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def apply_cp(model: nn.Module, cp_mesh) -> None:
    """Swap the attention core of every block of `model` for a `ContextParallelCore` over
    `cp_mesh` (1-D). The batch split itself (each rank's T/cp tokens, labels and positions) is
    the data loader's (data/loader.py `BatchReader`)."""
    group, cp = cp_mesh.get_group(), cp_mesh.size()
    for attn in attention_modules(model):
        if not isinstance(attn.core, ContextParallelCore):
            attn.core = ContextParallelCore(attn.core, group, cp)


def sent_bytes(model: nn.Module) -> int:
    """Bytes this rank's all-to-alls have sent to other ranks in forward passes so far."""
    return sum(m.sent_bytes for m in model.modules() if isinstance(m, ContextParallelCore))
