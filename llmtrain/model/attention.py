"""Causal multi-head attention with grouped-query (Ainslie et al. 2023) and multi-query
(Shazeer 2019) key/value heads, computed by `F.scaled_dot_product_attention`.

Options (both off by default, each applied right after the projections):
  qk_norm         RMSNorm over head_dim on every query and key head, one learned scale of
                  head_dim shared by the heads, before rope (`q_norm`, `k_norm`; Qwen3's
                  layout; Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion
                  Parameters", section 3.1): bounds the attention logits.
  value_residual  ResFormer (Zhou et al. 2024, "Value Residual Learning", section 3, at its
                  lambda_1 = lambda_2 = 1/2): layer n > 1 attends over (V_n + V_1) / 2, V_1 the
                  first layer's values. forward then also returns this layer's own V_n, so the
                  caller can hand the first layer's to the others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.model.norms import RMSNorm
from llmtrain.model.rope import apply_rope


class ScaledDotProduct(nn.Module):
    """softmax(q k^T / sqrt(head_dim) + mask) v (Vaswani et al. 2017, eq. 1): the only part of
    attention that reads other positions. Its own module so that parallel/context.py can run it on
    a sequence split over ranks (it swaps this module for one that gathers the sequence).
    `scale` replaces 1/sqrt(head_dim) (None: that default); muP's is ~1/head_dim (model/mup.py,
    Yang et al. 2022, section 4)."""

    def __init__(self, dropout: float = 0.0, scale: float | None = None):
        super().__init__()
        self.dropout = dropout
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """q [B, H, T, head_dim], k and v [B, H_kv, T, head_dim]; mask [B, 1, T, T] bool (True =
        attend) or None for the plain causal mask."""
        # enable_gqa (torch >= 2.5) lets query head h read kv head h // (n_heads / n_kv_heads),
        # the same grouping as Hugging Face's repeat_kv.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1], scale=self.scale)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, bias: bool = False,
                 dropout: float = 0.0, qk_norm_eps: float | None = None,
                 value_residual: bool = False, scale: float | None = None):
        """qk_norm_eps: QK-norm with this RMSNorm eps (None: off); scale: the
        attention scores' scale (None: 1/sqrt(head_dim); muP passes its own)."""
        super().__init__()
        self.head_dim = dim // n_heads
        self.core = ScaledDotProduct(dropout, scale)
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=bias)
        qk_norm = qk_norm_eps is not None
        self.q_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, qk_norm_eps) if qk_norm else None
        self.value_residual = value_residual

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, first_values: torch.Tensor | None = None):
        """x [B, T, D]; rope = (cos, sin), [T, head_dim] or per sequence [B, T, head_dim]; mask
        [B, 1, T, T] bool (True = attend) replaces the plain causal mask. Head counts come from
        the weight shapes (`view(..., -1, head_dim)`), so a tensor-parallel shard holding a
        subset of the heads runs unchanged. With value_residual: `first_values` is V_1 [B, T,
        H_kv, head_dim] (None in the first layer) and the result is (output, this layer's V)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mixed = v if first_values is None else 0.5 * (v + first_values)
        y = self.core(q.transpose(1, 2), k.transpose(1, 2), mixed.transpose(1, 2), mask)
        out = self.wo(y.transpose(1, 2).reshape(B, T, -1))
        return (out, v) if self.value_residual else out

    def reset_parameters(self) -> None:
        """The QK-norm scales (ones); the projections are the block's to initialise."""
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def linears(self):
        """(query/key-like, input, output) projections, for the block's init schemes."""
        return (self.wq, self.wk), (self.wv,), (self.wo,)

    def mixing_params(self) -> int:
        return 0

    def mixing_flops_per_token(self, seq_len: int) -> int:
        """Scores q k^T and their use on v: 2 x 2 d T forward, x3 with backward (Kaplan et al.
        2020 table 1; PaLM app. B): 12 d T."""
        return 12 * self.wq.out_features * seq_len
