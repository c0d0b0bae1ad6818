"""Position-wise feed-forward network: an activation MLP or a GLU variant.

Plain:  w2(act(w1 x)), act one of relu (Vaswani et al. 2017), gelu (Hendrycks & Gimpel 2016),
        silu (Swish-1, Ramachandran et al. 2017), elu (Clevert et al. 2015), selu (Klambauer et
        al. 2017).
GLU:    w2(act(w1 x) * w3 x), the variants of Shazeer 2020 ("GLU Variants Improve Transformer",
        eq. 5-6): glu (sigmoid, Dauphin et al. 2017), reglu (relu), geglu (gelu), swiglu
        (Swish-1 = silu). The hidden width is `model.ffn_dim` as given; only its default shrinks
        to 8/3 d_model for the GLU family (see config.ModelConfig.ffn_dim).
Polynomial composition (Zhuo et al. 2025, "Polynomial Composition Activations: Unleashing the
        Dynamics of Large Language Models", section 3), plain MLPs of order r = 3 with learned
        coefficients a_0..a_3 (`PolyActivation`):
        polyrelu  sum_i a_i relu(x)^i
        polynorm  sum_i a_i N(x^i), N(u) = u / sqrt(mean(u^2) + eps) over the hidden units
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "elu": F.elu, "selu": F.selu}
# the gate of each name in config.GLU_ACTIVATIONS (tests/test_planner.py keeps the two equal)
GLU_ACTIVATIONS = {"glu": torch.sigmoid, "reglu": F.relu, "geglu": F.gelu, "swiglu": F.silu}
POLY_ACTIVATIONS = ("polynorm", "polyrelu")


class PolyActivation(nn.Module):
    """PolyReLU / PolyNorm of order 3: a_0 + a_1 g(x) + a_2 g(x^2) + a_3 g(x^3) with g = N for
    PolyNorm and ReLU then powers for PolyReLU (relu(x)^i = relu(x^i) for odd i only, so PolyReLU
    takes the powers of relu(x)). Coefficients start as the authors' code does: a_1..a_3 = 1/3,
    a_0 = 0 (github.com/BryceZhuo/PolyCom); N's eps 1e-6 likewise."""

    def __init__(self, kind: str, eps: float = 1e-6):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.empty(3))  # a_1, a_2, a_3
        self.bias = nn.Parameter(torch.empty(1))  # a_0
        self.reset_parameters()

    def _norm(self, u: torch.Tensor) -> torch.Tensor:
        return u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "polyrelu":
            r = F.relu(x)
            powers = (r, r * r, r * r * r)
        else:  # the powers in fp32: x^3 of a bf16 activation overflows its mean of squares
            h = x.float()
            powers = tuple(self._norm(h ** i).to(x.dtype) for i in (1, 2, 3))
        return self.bias + sum(a * p for a, p in zip(self.weight, powers))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.fill_(1 / 3)
        self.bias.zero_()


class FeedForward(nn.Module):
    """act MLP: w2(act(w1 x)); GLU variant: w2(act(w1 x) * w3 x) (w3 only for the GLU family)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str, bias: bool = False):
        super().__init__()
        names = [*ACTIVATIONS, *GLU_ACTIVATIONS, *POLY_ACTIVATIONS]
        if activation not in names:
            raise ValueError(f"model.activation={activation!r} is not valid; use one of "
                             f"{', '.join(names)}")
        self.activation = activation
        self.poly = PolyActivation(activation) if activation in POLY_ACTIVATIONS else None
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias) if activation in GLU_ACTIVATIONS else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.poly is not None:
            return self.w2(self.poly(self.w1(x)))
        if self.w3 is None:
            return self.w2(ACTIVATIONS[self.activation](self.w1(x)))
        return self.w2(GLU_ACTIVATIONS[self.activation](self.w1(x)) * self.w3(x))
