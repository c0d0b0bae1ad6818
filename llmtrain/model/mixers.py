"""Token mixers other than attention (`model.mixer`), causal for decoder-only models.

Each takes x [B, T, D] (and an optional [B, 1, T, T] bool mask, True = may read, as Attention's
`mask` for documents packed in one sequence) and returns [B, T, D]; it replaces the attention
sublayer of a TransformerBlock, whose feed-forward sublayer stays.

  gmlp                the spatial gating unit of gMLP (Liu et al. 2021, "Pay Attention to MLPs",
                      eq. 2-3): z = act(x U) split into z1, z2 along channels,
                      s(z) = z1 * (W norm(z2) + b), out = s(z) V, with W [L, L] over token
                      positions. Decoders mask W lower-triangular (the paper's causal variant,
                      section 4), so position t mixes positions <= t only. W starts near zero
                      and b at one, so the unit starts as a plain GLU-style MLP (section 2).
  synthesizer_dense   Dense Synthesizer (Tay et al. 2020, "Synthesizer: Rethinking Self-Attention
                      in Transformer Models", eq. 1-2): per head, the attention row of token i is
                      predicted from x_i alone, B_i = W2 relu(W1 x_i) in R^L, Y = softmax(B) G(x).
  synthesizer_random  Random Synthesizer (same paper, eq. 3-4): per head a learned [L, L] matrix
                      R, independent of the input, Y = softmax(R) G(x).
L is `model.max_seq_len`: the spatial weights are sized for it and sliced to the first T rows
and columns, so any train.seq_len <= max_seq_len works (a causal slice of a causal matrix is the
same function on the shorter sequence). The synthesizers mask causally with -inf before the
softmax, as attention does.

`linears()` lists (query/key-like, input, output) projections for the block's init schemes,
`mixing_flops_per_token(T)` the FLOPs of the token-mixing matmul (forward + backward), and
`mixing_params()` the [L, L] weights that are not applied once per token (flops_per_token counts
them in the mixing term instead of 6 N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.norms import build_norm


def _causal(T: int, device, mask: torch.Tensor | None) -> torch.Tensor:
    """[T, T] lower-triangular bool, or the given [B, 1, T, T] mask as [B, 1, T, T]."""
    return mask if mask is not None else torch.ones(T, T, dtype=torch.bool,
                                                    device=device).tril()


class SpatialGatingMixer(nn.Module):
    """gMLP's spatial gating unit as a token mixer: d -> 2 d (gelu) -> gate over positions -> d."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, L = cfg.d_model, cfg.max_seq_len
        self.proj_in = nn.Linear(d, 2 * d, bias=cfg.bias)
        self.gate_norm = build_norm(cfg.norm, d, cfg.norm_eps, cfg.bias)
        self.spatial_weight = nn.Parameter(torch.empty(L, L))
        self.spatial_bias = nn.Parameter(torch.empty(L))
        self.proj_out = nn.Linear(d, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        z1, z2 = F.gelu(self.proj_in(x)).chunk(2, dim=-1)
        w = self.spatial_weight[:T, :T].masked_fill(~_causal(T, x.device, mask), 0.0)
        if w.dim() == 4:  # per-sequence document mask
            w = w[:, 0]
        gate = torch.matmul(w.to(z2.dtype), self.gate_norm(z2)) + self.spatial_bias[:T, None]
        return self.proj_out(z1 * gate)

    def linears(self):
        return (), (self.proj_in,), (self.proj_out,)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # near-zero W (uniform within +-1e-3 / L) and unit b (Liu et al. 2021, section 2)
        nn.init.uniform_(self.spatial_weight, -1e-3 / self.spatial_weight.shape[0],
                         1e-3 / self.spatial_weight.shape[0])
        nn.init.ones_(self.spatial_bias)
        self.gate_norm.reset_parameters()

    def mixing_params(self) -> int:
        return self.spatial_weight.numel() + self.spatial_bias.numel()

    def mixing_flops_per_token(self, seq_len: int) -> int:
        return 6 * seq_len * self.proj_out.in_features  # [T, T] x [T, d] forward, x3 with backward


class Synthesizer(nn.Module):
    """Dense (`random=False`) or Random (`random=True`) Synthesizer, n_heads heads, causal."""

    def __init__(self, cfg: ModelConfig, random: bool):
        super().__init__()
        d, L, H = cfg.d_model, cfg.max_seq_len, cfg.n_heads
        self.n_heads, self.max_len = H, L
        if random:
            self.w1 = self.w2 = None
            self.random_logits = nn.Parameter(torch.empty(H, L, L))
        else:
            self.w1 = nn.Linear(d, d, bias=cfg.bias)
            self.w2 = nn.Linear(d, H * L, bias=cfg.bias)
            self.random_logits = None
        self.wv = nn.Linear(d, d, bias=cfg.bias)
        self.wo = nn.Linear(d, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        H = self.n_heads
        if self.random_logits is None:  # B_i = W2 relu(W1 x_i): [B, T, H, L] -> [B, H, T, T]
            scores = self.w2(F.relu(self.w1(x))).view(B, T, H, self.max_len)[..., :T]
            scores = scores.transpose(1, 2)
        else:
            scores = self.random_logits[None, :, :T, :T]
        scores = scores.float().masked_fill(~_causal(T, x.device, mask), float("-inf"))
        v = self.wv(x).view(B, T, H, D // H).transpose(1, 2)
        y = torch.matmul(scores.softmax(-1).to(v.dtype), v)
        return self.wo(y.transpose(1, 2).reshape(B, T, D))

    def linears(self):
        qk = () if self.w1 is None else (self.w1, self.w2)
        return qk, (self.wv,), (self.wo,)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.random_logits is not None:
            nn.init.normal_(self.random_logits, 0.0, 1.0)  # R ~ N(0, 1), trainable

    def mixing_params(self) -> int:
        return 0 if self.random_logits is None else self.random_logits.numel()

    def mixing_flops_per_token(self, seq_len: int) -> int:
        return 6 * seq_len * self.wo.in_features  # softmax(B) [T, T] x V [T, d]


def build_mixer(cfg: ModelConfig) -> nn.Module:
    """The token mixer named by `model.mixer` (not `attention`, which transformer.py builds)."""
    if cfg.mixer == "gmlp":
        return SpatialGatingMixer(cfg)
    if cfg.mixer in ("synthesizer_dense", "synthesizer_random"):
        return Synthesizer(cfg, random=cfg.mixer == "synthesizer_random")
    raise ValueError(f"model.mixer={cfg.mixer!r} is not valid; use attention, gmlp, "
                     f"synthesizer_dense or synthesizer_random")
