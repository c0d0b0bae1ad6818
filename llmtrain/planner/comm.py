"""Alpha-beta cost of collectives: t = steps * alpha + bytes_moved / bandwidth.

Ring algorithms (Thakur et al. 2005; what NCCL uses for large messages): an all-reduce of B bytes
over n ranks moves 2(n-1)/n * B per rank in 2(n-1) steps; all-gather and reduce-scatter (B = the
full, gathered size) move (n-1)/n * B in n-1 steps; all-to-all the same. A group runs at NVLink
speed when it sits inside one node and at the per-GPU network share when it spans nodes.

Ranks are laid out as the mesh of docs/architecture.md, tp innermost:
rank = (((pp * dp_replicate + r) * dp_shard + s) * cp + c) * tp + t. A dimension's group
therefore has a stride (the product of the dimensions inside it: tp for cp, tp x cp for
dp_shard) and stays in one node when stride * size <= gpus_per_node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmtrain.planner.compute import Hardware


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    alpha_s: float
    inter_node: bool


def link_for(stride: int, size: int, hw: Hardware) -> Link:
    """The slowest link a group of `size` ranks `stride` apart crosses."""
    if stride * size <= hw.gpus_per_node:
        return Link(hw.nvlink_gbps * 1e9 * hw.link_efficiency, hw.alpha_intra_us * 1e-6, False)
    return Link(hw.net_gbps * 1e9 * hw.link_efficiency, hw.alpha_inter_us * 1e-6, True)


def ring_bytes(op: str, n: int, nbytes: float) -> float:
    """Bytes each rank sends for `op` on `nbytes` (the full tensor) over n ranks."""
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n * nbytes
    if op == "p2p":
        return nbytes
    raise ValueError(f"unknown collective {op!r}")


def collective_time(op: str, n: int, nbytes: float, link: Link) -> float:
    """Seconds for one collective under the alpha-beta model (0 for a group of one)."""
    if n <= 1 and op != "p2p":
        return 0.0
    steps = {"all_reduce": 2 * (n - 1), "p2p": 1}.get(op, n - 1)
    return steps * link.alpha_s + ring_bytes(op, n, nbytes) / link.bytes_per_s


def cp_all_to_all_bytes(micro_batch: int, seq_len: int, n_heads: int, n_kv_heads: int,
                        head_dim: int, cp: int, bytes_per_el: int, tp: int = 1) -> float:
    """Bytes one rank sends in the forward pass of one attention layer under all-to-all context
    parallelism (DeepSpeed-Ulysses, Jacobs et al. 2023): q, k and v go from sequence-sharded to
    head-sharded and the output back, four all-to-alls over the cp ranks. Each rank holds
    [B, T/cp, h, head_dim] of each (h: the heads of its tp rank; key/value heads that cp does
    not divide are repeated up to lcm(kv heads, cp) first) and keeps 1/cp of it. The backward sends
    the same again (the gradients take the reverse path)."""
    if cp <= 1:
        return 0.0
    # a tp rank keeps at least one kv head (MQA's is replicated); ContextParallelCore repeats
    # kv heads that cp does not divide up to lcm(kv heads, cp)
    q_heads, kv_heads = n_heads // tp, max(n_kv_heads // tp, 1)
    kv_heads = math.lcm(kv_heads, cp)
    local = micro_batch * seq_len / cp * head_dim * bytes_per_el  # one head's [B, T/cp, head_dim]
    return ring_bytes("all_to_all", cp, local * (2 * q_heads + 2 * kv_heads))


def cp_attention_time(micro_batch: int, seq_len: int, n_heads: int, n_kv_heads: int,
                      head_dim: int, cp: int, bytes_per_el: int, link: Link,
                      tp: int = 1) -> float:
    """Seconds of the four all-to-alls of one attention layer's forward under all-to-all
    context parallelism (q, k, v in, the output back; `cp_all_to_all_bytes`), each n-1 steps
    under the alpha-beta model as `collective_time` counts an all-to-all."""
    if cp <= 1:
        return 0.0
    sent = cp_all_to_all_bytes(micro_batch, seq_len, n_heads, n_kv_heads, head_dim, cp,
                               bytes_per_el, tp)
    return 4 * (cp - 1) * link.alpha_s + sent / link.bytes_per_s
