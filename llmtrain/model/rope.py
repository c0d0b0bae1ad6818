"""Rotary position embedding (RoFormer, Su et al. 2021), in Hugging Face Llama's layout.

The pairs that rotate together are (i, i + head_dim/2) -- "rotate_half" on the first and second
half of each head -- not the interleaved (2i, 2i+1) pairs of the paper. That is the convention of
Hugging Face `LlamaForCausalLM`, so exported q/k weights need no permutation.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling=None, seq_len: int = 0,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention factor): the rotation speeds theta^(-2i/d) after the
    context-extension rule `scaling` (a RopeScalingConfig or None), and the factor cos and sin are
    multiplied by (1 except YaRN). `seq_len` is the length of the sequence the table serves (only
    dynamic NTK reads it). Equal to transformers' ROPE_INIT_FUNCTIONS
    (tests/test_rope_scaling.py)."""
    d = head_dim
    kind = "none" if scaling is None else scaling.type
    if kind == "dynamic":
        # Dynamic NTK (bloc97/emozilla; YaRN paper, Peng et al. 2023, section 3.3): beyond the
        # pretraining length L0 the base grows with the length L actually used,
        # b' = b (s L / L0 - (s - 1))^(d / (d - 2)); at L <= L0 the rope is unchanged.
        L0 = scaling.original_max_position_embeddings
        L = max(seq_len, L0)
        theta = theta * ((scaling.factor * L / L0) - (scaling.factor - 1)) ** (d / (d - 2))
    pos_freqs = theta ** (torch.arange(0, d, 2, device=device).float() / d)
    inv_freq = 1.0 / pos_freqs
    if kind == "linear":
        # Position interpolation (Chen et al. 2023, eq. 4): positions m -> m / s.
        return inv_freq / scaling.factor, 1.0
    if kind == "yarn":
        return _yarn(d, theta, scaling, pos_freqs, device)
    if kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return inv_freq, 1.0


def _yarn(d: int, theta: float, s, pos_freqs: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, section 3.2 "NTK-by-parts" and eq. 21-22): dimensions that turn
    fewer than beta_slow times over the pretraining length L0 are interpolated (speed / s), those
    that turn more than beta_fast times are kept, a linear ramp between; cos/sin times
    sqrt(1/t) = 0.1 ln(s) + 1 (eq. 22) unless attention_factor is given."""
    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over L0
        return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) \
            / (2 * math.log(theta))
    # rounded outwards, as transformers does by default (rope_parameters truncate=true)
    low = max(math.floor(dim_of(s.beta_fast)), 0)
    high = min(math.ceil(dim_of(s.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = (1 - ramp).to(device)  # 1 = extrapolate (fast dimensions), 0 = interpolate
    inv_freq = (1.0 / (s.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    factor = s.attention_factor
    if factor is None:
        factor = 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0
    return inv_freq, factor


def _llama3(inv_freq: torch.Tensor, s) -> torch.Tensor:
    """Llama 3.1's rule (Meta's reference `apply_scaling`): wavelengths shorter than
    L0 / high_freq_factor kept, longer than L0 / low_freq_factor divided by s, a smooth blend
    between."""
    L0, lo, hi = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > L0 / lo, inv_freq / s.factor, inv_freq)
    smooth = (L0 / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < L0 / hi) * ~(wavelen > L0 / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(head_dim: int, seq_len: int, theta: float = 10000.0,
                 device: torch.device | str | None = None,
                 scaling=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [seq_len, head_dim]: angle(t, i) = t * inv_freq_i (theta^(-2i/d)
    unscaled), times the attention factor of `scaling` (YaRN)."""
    inv_freq, factor = rope_inv_freq(head_dim, theta, scaling, seq_len, device)
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos() * factor, angles.sin() * factor


def dynamic_length(cfg, seq_len: int) -> bool:
    """Whether dynamic NTK scaling changes the tables of a `seq_len`-token sequence (it does only
    beyond the pretraining length, as transformers' `dynamic_rope_update`)."""
    s = cfg.rope_scaling
    return s.type == "dynamic" and seq_len > s.original_max_position_embeddings


def register_rope_tables(module: torch.nn.Module, cfg) -> None:
    """`module.rope_cos` / `rope_sin`: non-persistent [max_seq_len, head_dim] buffers for
    `cfg.position == "rope"`, else None (a model config: head_dim, max_seq_len, rope_theta,
    rope_scaling). Dynamic NTK's buffers hold the plain tables (its rule at the pretraining
    length); the model computes longer sequences' tables in forward."""
    if cfg.position != "rope":
        module.rope_cos = module.rope_sin = None
        return
    cos, sin = _tables(cfg)
    module.register_buffer("rope_cos", cos, persistent=False)
    module.register_buffer("rope_sin", sin, persistent=False)


def _tables(cfg, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    s = cfg.rope_scaling
    # dynamic: the buffers serve sequences up to the pretraining length, where it is plain rope
    return rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device,
                        None if s.type in ("none", "dynamic") else s)


@torch.no_grad()
def reset_rope_tables(module: torch.nn.Module, cfg) -> None:
    """Recompute the tables in place (after `to_empty` on the meta device)."""
    if module.rope_cos is not None:
        cos, sin = _tables(cfg, module.rope_cos.device)
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
