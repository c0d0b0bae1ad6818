"""Mixture of Softmaxes output layer (Yang et al. 2018, "Breaking the Softmax Bottleneck: A
High-Rank RNN Language Model", eq. 5), `model.output: mos`:

    P(w | h) = sum_k pi_k(h) softmax(E h_k)_w,  pi(h) = softmax(W_pi h),  h_k = tanh(W_k h)

with E the model's output layer (tied to the token embedding when tie_embeddings). This module
holds pi's and the K latents' projections; Transformer.forward applies E to each latent and mixes
in log space, returning log P (so that cross entropy on it is the MoS loss: log_softmax of
log-probabilities is the identity). With K = 1 it is the plain softmax of the tanh latent.
"""

from __future__ import annotations

import torch
from torch import nn


class MixtureOfSoftmaxes(nn.Module):
    """h [..., d] -> (latents [..., K, d], log prior [..., K])."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.k = k
        self.prior = nn.Linear(dim, k, bias=False)
        self.latent = nn.Linear(dim, k * dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        latents = torch.tanh(self.latent(h)).unflatten(-1, (self.k, h.shape[-1]))
        return latents, self.prior(h).float().log_softmax(-1)

    @staticmethod
    def mix(logits: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
        """logits [..., K, V], log prior [..., K] -> log sum_k pi_k softmax(logits_k), [..., V]."""
        return torch.logsumexp(log_prior[..., None] + logits.float().log_softmax(-1), dim=-2)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.prior.weight, 0.0, std)
        nn.init.normal_(self.latent.weight, 0.0, std)
        nn.init.zeros_(self.latent.bias)
