"""Normalization layers: LayerNorm (Ba et al. 2016), RMSNorm (Zhang & Sennrich 2019), and `none`
(an identity, for ReZero / Fixup models that train without normalisation)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 as Hugging Face Llama does."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class NoNorm(nn.Identity):
    """`model.norm: none`: the identity, with the reset_parameters() every norm has."""

    def reset_parameters(self) -> None:
        pass


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """`layernorm` (with a bias only when `bias`), `rmsnorm` (both reset to weight 1, bias 0) or
    `none` (identity)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    if kind == "none":
        return NoNorm()
    raise ValueError(f"model.norm={kind!r} is not valid; use layernorm, rmsnorm or none")
