"""Where the residual connection and the normalisation go (`model.norm_position`), written once for
the decoder-only block (transformer.py) and the encoder and decoder blocks (encoder_decoder.py).

A layer is a list of sublayers [(LN_1, f_1), (LN_2, f_2), ...] (attention, cross-attention,
feed-forward; f includes its residual dropout), applied in order to x:
  pre       x = x + f(LN(x))            (Xiong et al. 2020, "On Layer Normalization in the
                                         Transformer Architecture"; GPT-2, Llama)
  post      x = LN(x + f(x))            (Vaswani et al. 2017, "Attention Is All You Need")
  deepnorm  x = LN(alpha * x + f(x))    (Wang et al. 2022, "DeepNet: Scaling Transformers to
                                         1,000 Layers"; alpha below, init gain beta)
  b2t       x = LN(x + f(x)), but the last sublayer also adds the layer input x_0:
            x = LN(x + f(x) + x_0)      (Takase et al. 2022, "B2T Connection", eq. 4)
Stateless functions of the norm and sublayer modules: the modules stay where the blocks hold them,
so parameter names (checkpoints, tensor-parallel plans, HF export) do not depend on placement.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Sublayer = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]  # (LN, f)


def pre_ln(x: torch.Tensor, norm: nn.Module, f) -> torch.Tensor:
    """Pre-LN: x + f(LN(x))."""
    return x + f(norm(x))


def post_ln(x: torch.Tensor, norm: nn.Module, f) -> torch.Tensor:
    """Post-LN: LN(x + f(x)), which is DeepNorm at alpha = 1."""
    return deepnorm(x, norm, f, 1.0)


def deepnorm(x: torch.Tensor, norm: nn.Module, f, alpha: float) -> torch.Tensor:
    """DeepNorm: LN(alpha * x + f(x)), Post-LN with the residual up-weighted by alpha > 1, which
    bounds the model update as depth grows (constants below)."""
    return norm(alpha * x + f(x))


def b2t(x: torch.Tensor, sublayers: list[Sublayer]) -> torch.Tensor:
    """B2T: Post-LN sublayers, the layer input x bypassing every LN but the last one's."""
    h = x
    for norm, f in sublayers[:-1]:
        h = norm(h + f(h))
    norm, f = sublayers[-1]
    return norm(h + f(h) + x)


def residual_layer(norm_position: str, x: torch.Tensor, sublayers: list[Sublayer],
                   alpha: float = 1.0) -> torch.Tensor:
    """x through one layer's sublayers, each placed as `norm_position` says (alpha: DeepNorm's)."""
    if norm_position == "b2t":
        return b2t(x, sublayers)
    for norm, f in sublayers:
        if norm_position == "pre":
            x = pre_ln(x, norm, f)
        elif norm_position == "post":
            x = post_ln(x, norm, f)
        elif norm_position == "deepnorm":
            x = deepnorm(x, norm, f, alpha)
        else:
            raise ValueError(f"model.norm_position={norm_position!r} is not valid; "
                             f"use pre, post, deepnorm or b2t")
    return x


# DeepNet's constants per architecture (Wang et al. 2022, with their DeepNorm pseudocode): alpha
# scales the residual, beta is the Xavier gain of the value, output and FFN projections at init
# (q and k keep gain 1).

def deepnorm_alpha(n_layers: int) -> float:
    """Residual scale of an N-layer decoder-only model: (2N)^(1/4)."""
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """Init gain of an N-layer decoder-only model: (8N)^(-1/4)."""
    return (8 * n_layers) ** -0.25


def deepnorm_encoder_alpha(n_encoder_layers: int, n_decoder_layers: int) -> float:
    """Encoder residual scale for N encoder, M decoder layers: 0.81 (N^4 M)^(1/16)."""
    return 0.81 * (n_encoder_layers ** 4 * n_decoder_layers) ** (1 / 16)


def deepnorm_encoder_beta(n_encoder_layers: int, n_decoder_layers: int) -> float:
    """Encoder init gain for N encoder, M decoder layers: 0.87 (N^4 M)^(-1/16)."""
    return 0.87 * (n_encoder_layers ** 4 * n_decoder_layers) ** (-1 / 16)


def deepnorm_decoder_alpha(n_decoder_layers: int) -> float:
    """Decoder residual scale (encoder-decoder) for M decoder layers: (3M)^(1/4)."""
    return (3 * n_decoder_layers) ** 0.25


def deepnorm_decoder_beta(n_decoder_layers: int) -> float:
    """Decoder init gain (encoder-decoder) for M decoder layers: (12M)^(-1/4)."""
    return (12 * n_decoder_layers) ** -0.25
