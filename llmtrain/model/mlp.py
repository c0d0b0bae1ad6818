"""Position-wise feed-forward network: an activation MLP or a GLU variant.

Plain:  w2(act(w1 x)), act one of relu (Vaswani et al. 2017), gelu (Hendrycks & Gimpel 2016),
        silu (Swish-1, Ramachandran et al. 2017), elu (Clevert et al. 2015), selu (Klambauer et
        al. 2017).
GLU:    w2(act(w1 x) * w3 x), the variants of Shazeer 2020 ("GLU Variants Improve Transformer",
        eq. 5-6): glu (sigmoid, Dauphin et al. 2017), reglu (relu), geglu (gelu), swiglu
        (Swish-1 = silu). The hidden width is `model.ffn_dim` as given; only its default shrinks
        to 8/3 d_model for the GLU family (see config.ModelConfig.ffn_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "elu": F.elu, "selu": F.selu}
# the gate of each name in config.GLU_ACTIVATIONS (tests/test_planner.py keeps the two equal)
GLU_ACTIVATIONS = {"glu": torch.sigmoid, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}


class FeedForward(nn.Module):
    """act MLP: w2(act(w1 x)); GLU variant: w2(act(w1 x) * w3 x) (w3 only for the GLU family)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS and activation not in GLU_ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is not valid; use one of "
                             f"{', '.join([*ACTIVATIONS, *GLU_ACTIVATIONS])}")
        self.activation = activation
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if activation in GLU_ACTIVATIONS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is None:
            return self.w2(ACTIVATIONS[self.activation](self.w1(x)))
        return self.w2(GLU_ACTIVATIONS[self.activation](self.w1(x)) * self.w3(x))
