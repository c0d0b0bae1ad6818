"""Position-wise feed-forward network: GELU MLP (Hendrycks & Gimpel 2016) or a GLU variant
(SwiGLU / GEGLU, Shazeer 2020 "GLU Variants Improve Transformer")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GLU_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu}


class FeedForward(nn.Module):
    """gelu: w2(gelu(w1 x)); swiglu: w2(silu(w1 x) * w3 x); geglu: w2(gelu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, bias: bool = False):
        super().__init__()
        if activation not in ("gelu", *GLU_ACTIVATIONS):
            raise ValueError(f"model.activation={activation!r} is not valid; "
                             f"use gelu, swiglu or geglu")
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if activation in GLU_ACTIVATIONS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(F.gelu(self.w1(x)))
        return self.w2(GLU_ACTIVATIONS[self.activation](self.w1(x)) * self.w3(x))
