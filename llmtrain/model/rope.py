"""Rotary position embedding (RoFormer, Su et al. 2021), in Hugging Face Llama's layout.

The pairs that rotate together are (i, i + head_dim/2) -- "rotate_half" on the first and second
half of each head -- not the interleaved (2i, 2i+1) pairs of the paper. That is the convention of
Hugging Face `LlamaForCausalLM`, so exported q/k weights need no permutation.
"""

from __future__ import annotations

import torch


def rope_cos_sin(head_dim: int, seq_len: int, theta: float = 10000.0,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [seq_len, head_dim]: angle(t, i) = t * theta^(-2i/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def register_rope_tables(module: torch.nn.Module, cfg) -> None:
    """`module.rope_cos` / `rope_sin`: non-persistent [max_seq_len, head_dim] buffers for
    `cfg.position == "rope"`, else None (a model config: head_dim, max_seq_len, rope_theta)."""
    if cfg.position != "rope":
        module.rope_cos = module.rope_sin = None
        return
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


@torch.no_grad()
def reset_rope_tables(module: torch.nn.Module, cfg) -> None:
    """Recompute the tables in place (after `to_empty` on the meta device)."""
    if module.rope_cos is not None:
        cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta,
                                device=module.rope_cos.device)
        module.rope_cos.copy_(cos)
        module.rope_sin.copy_(sin)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, head_dim] by position; cos/sin are [T, head_dim] (the same positions
    for every sequence) or [B, T, head_dim]."""
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over the heads
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)
