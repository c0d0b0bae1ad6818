"""Absolute sinusoidal encodings (Vaswani et al. 2017, section 3.5) and T5's bucketed relative
position bias (Raffel et al. 2020, section 2.1; `_relative_position_bucket` in T5/Mesh TensorFlow).
Rotary and learned positions live in rope.py and the models themselves."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(seq_len: int, dim: int, device: torch.device | str | None = None
                     ) -> torch.Tensor:
    """[seq_len, dim]: PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(same)."""
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, device=device).float() / dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    table = torch.zeros(seq_len, dim, device=device)
    table[:, 0::2] = angles.sin()
    table[:, 1::2] = angles.cos()[:, : dim // 2]
    return table


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True,
                             num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bucket of `key_pos - query_pos`, as T5: half the buckets (of a side) hold the exact
    distances 0..max_exact-1, the rest grow logarithmically up to `max_distance`, beyond which
    everything shares the last bucket. Bidirectional: the upper half of the buckets is for keys
    after the query. Unidirectional (causal): only distances to the past count, the future is 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float().clamp(min=1) / max_exact)
                         / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention logits of every layer of a
    stack (T5 computes it in the first layer and shares it with the others)."""

    def __init__(self, n_heads: int, bidirectional: bool, num_buckets: int = 32,
                 max_distance: int = 128):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """Bias [1, n_heads, q_len, k_len] for queries at 0..q_len-1 and keys at 0..k_len-1."""
        device = self.relative_attention_bias.weight.device
        rel = (torch.arange(k_len, device=device)[None, :]
               - torch.arange(q_len, device=device)[:, None])
        buckets = relative_position_bucket(rel, self.bidirectional, self.num_buckets,
                                           self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.relative_attention_bias.weight, 0.0, std)
