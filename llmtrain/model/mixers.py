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
  linear_attention    causal linear attention (Katharopoulos et al. 2020, "Transformers are RNNs",
                      sections 3.2-3.3): per head, with phi(x) = elu(x) + 1,
                      V'_i = phi(Q_i)^T S_i / (phi(Q_i)^T Z_i), S_i = sum_{j<=i} phi(K_j) V_j^T,
                      Z_i = sum_{j<=i} phi(K_j): prefix sums over positions, O(T) time. Packed
                      documents: S_i and Z_i start again at each document (the prefix sum up to
                      the document's start is subtracted), which is the block-diagonal mask's
                      function; other masks are refused. No positions (rope is not applied: the
                      paper has none, and the causal sums already see order).
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


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, section 3.2.1): positive, so the
    normaliser is."""
    return F.elu(x) + 1


def document_starts(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the first position token t may read, from a block-diagonal causal mask
    [B, 1, T, T]; ValueError for any other mask (prefix sums can only restart)."""
    rows = mask[:, 0]
    starts = rows.int().argmax(-1)  # the first True of each row
    T = rows.shape[-1]
    j = torch.arange(T, device=mask.device)
    block = (j >= starts[..., None]) & (j <= j[:, None])
    if not torch.equal(block, rows):
        raise ValueError("mixer=linear_attention honours block-diagonal causal (document) masks "
                         "only")
    return starts


def causal_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            starts: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """phi-mapped q, k [B, T, H, M] and v [B, T, H, Dv] -> [B, T, H, Dv] by the causal prefix
    sums of section 3.3 (S_i = cumsum phi(K) V^T, Z_i = cumsum phi(K)); `starts` [B, T]: each
    token's document start, whose preceding sums are subtracted. eps in the denominator as the
    paper's code (fast-transformers) has it. Computed in fp32; S_i is held for every i (T d M
    elements per sequence), the paper's memory-lean form needs a custom kernel."""
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    S = torch.einsum("bthm,bthd->bthmd", k, v).cumsum(1)
    Z = k.cumsum(1)
    if starts is not None:
        b = torch.arange(q.shape[0], device=q.device)[:, None]
        S = S - F.pad(S, (0, 0, 0, 0, 0, 0, 1, 0))[b, starts]  # padded[s] = sum over j < s
        Z = Z - F.pad(Z, (0, 0, 0, 0, 1, 0))[b, starts]
    num = torch.einsum("bthm,bthmd->bthd", q, S)
    den = torch.einsum("bthm,bthm->bth", q, Z)
    return (num / (den[..., None] + eps)).to(dtype)


class LinearAttention(nn.Module):
    """n_heads heads of causal linear attention with projections wq, wk, wv, wo (d x d)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(d, d, bias=cfg.bias)
        self.wk = nn.Linear(d, d, bias=cfg.bias)
        self.wv = nn.Linear(d, d, bias=cfg.bias)
        self.wo = nn.Linear(d, d, bias=cfg.bias)

    def forward(self, x: torch.Tensor, rope=None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, -1) for w in (self.wq, self.wk, self.wv))
        starts = None if mask is None else document_starts(mask)
        y = causal_linear_attention(elu_feature_map(q), elu_feature_map(k), v, starts)
        return self.wo(y.reshape(B, T, D))

    def linears(self):
        return (self.wq, self.wk), (self.wv,), (self.wo,)

    def reset_parameters(self) -> None:
        pass

    def mixing_params(self) -> int:
        return 0

    def mixing_flops_per_token(self, seq_len: int) -> int:
        """Per token and head, phi(K) V^T into S (M Dv products + the prefix sum's M Dv adds)
        and phi(Q)^T S (2 M Dv): 4 d head_dim forward, x3 with backward, whatever seq_len (the
        normaliser's O(d) terms are left out, as attention's softmax is)."""
        return 12 * self.wo.in_features * (self.wo.in_features // self.n_heads)


def build_mixer(cfg: ModelConfig) -> nn.Module:
    """The token mixer named by `model.mixer` (not `attention`, which transformer.py builds)."""
    if cfg.mixer == "gmlp":
        return SpatialGatingMixer(cfg)
    if cfg.mixer in ("synthesizer_dense", "synthesizer_random"):
        return Synthesizer(cfg, random=cfg.mixer == "synthesizer_random")
    if cfg.mixer == "linear_attention":
        return LinearAttention(cfg)
    raise ValueError(f"model.mixer={cfg.mixer!r} is not valid; use attention, gmlp, "
                     f"synthesizer_dense, synthesizer_random or linear_attention")
