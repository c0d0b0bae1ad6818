"""Decoder-only Transformer (Vaswani et al. 2017) with Llama/torchtitan module names.

Residual/normalization placement (`norm_position`), per layer with sublayers f = attn then ffn:
  pre       x = x + f(LN(x))                        (Xiong et al. 2020; GPT-2, Llama)
  post      x = LN(x + f(x))                        (Vaswani et al. 2017)
  deepnorm  x = LN(alpha * x + f(x))                (Wang et al. 2022, "DeepNet", decoder-only)
  b2t       h = LN(x + attn(x)); x = LN(h + ffn(h) + x)
            (Takase et al. 2022, "B2T Connection: Serving Stability and Performance in Deep
            Transformers", eq. 4: the layer input bypasses every LN of the layer but the last)
Only pre-LN has a final norm (`norm`); for the others `norm` is None, as their last layer
already ends in an LN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.attention import Attention
from llmtrain.model.mlp import FeedForward
from llmtrain.model.moe import MoE, moe_layers, moe_stats, aux_loss as moe_aux_loss
from llmtrain.model.norms import build_norm
from llmtrain.model.rope import rope_cos_sin


def deepnorm_alpha(n_layers: int) -> float:
    """Residual scale of DeepNet for an N-layer decoder-only model: (2N)^(1/4) (Wang et al. 2022)."""
    return (2 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """Init gain of DeepNet for an N-layer decoder-only model: (8N)^(-1/4) (Wang et al. 2022)."""
    return (8 * n_layers) ** -0.25


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_layers = cfg.n_layers
        self.norm_position = cfg.norm_position
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.bias, cfg.dropout)
        # MoE in every n-th layer, counting from the last of each group (Switch: every other)
        moe = cfg.moe.num_experts > 0 and (layer_id + 1) % cfg.moe.every_n_layers == 0
        self.feed_forward = (MoE(cfg) if moe else
                             FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.bias))
        self.attention_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)  # residual dropout (Vaswani et al. 2017, 5.4)
        self.alpha = deepnorm_alpha(cfg.n_layers) if cfg.norm_position == "deepnorm" else 1.0

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        def attn(h):
            return self.dropout(self.attention(h, rope, mask))

        def ffn(h):
            return self.dropout(self.feed_forward(h))

        if self.norm_position == "pre":
            h = x + attn(self.attention_norm(x))
            return h + ffn(self.ffn_norm(h))
        if self.norm_position == "b2t":
            h = self.attention_norm(x + attn(x))
            return self.ffn_norm(h + ffn(h) + x)
        # post-LN (alpha = 1) and DeepNorm
        h = self.attention_norm(self.alpha * x + attn(x))
        return self.ffn_norm(self.alpha * h + ffn(h))

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        a, f = self.attention, self.feed_forward
        moe = isinstance(f, MoE)
        w1, w2, w3 = (None, None, None) if moe else (f.w1, f.w2, f.w3)
        if self.norm_position == "deepnorm":
            # DeepNet pseudocode: xavier_normal(gain=1) for q, k; gain=beta for v, out and FFN.
            beta = deepnorm_beta(self.n_layers)
            gains = {a.wq: 1.0, a.wk: 1.0, a.wv: beta, a.wo: beta, w1: beta, w2: beta, w3: beta}
            for linear, gain in gains.items():
                if linear is not None:
                    nn.init.xavier_normal_(linear.weight, gain=gain)
            if moe:  # the xavier_normal std of one d x f expert matrix at gain beta
                d, h = f.experts.w1.shape[1:]
                f.init_weights(beta * math.sqrt(2 / (d + h)), beta * math.sqrt(2 / (d + h)))
        else:
            # GPT-2 (Radford et al. 2019): pre-LN residual projections scaled by 1/sqrt(2N),
            # one factor per residual add (two per layer).
            out_std = std / math.sqrt(2 * self.n_layers) if self.norm_position == "pre" else std
            for linear in (a.wq, a.wk, a.wv, w1, w3):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, std)
            for linear in (a.wo, w2):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, out_std)
            if moe:
                f.init_weights(std, out_std)
        for linear in (a.wq, a.wk, a.wv, a.wo, w1, w2, w3):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab]. Pipeline stages may delete entries of `layers` or
    set `tok_embeddings` (input is then hidden states [B, T, D]), `norm` or `output` (hidden states
    are returned) to None."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                               if cfg.position == "learned" else None)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(cfg.n_layers)})
        self.norm = (build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                     if cfg.norm_position == "pre" else None)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # Press & Wolf 2017
            self.output.weight = self.tok_embeddings.weight
        if cfg.position == "rope":
            cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = tokens.shape[1]
        if self.tok_embeddings is None:
            h = tokens
        else:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(torch.arange(T, device=h.device))
        rope = None if self.rope_cos is None else (self.rope_cos[:T], self.rope_sin[:T])
        mask = None
        if doc_ids is not None:  # block-diagonal causal: attend only within the same document
            causal = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
            mask = mask[:, None]  # [B, 1, T, T], broadcast over heads
        for layer in self.layers.values():
            h = layer(h, rope, mask)
        if self.norm is not None:
            h = self.norm(h)
        return h if self.output is None else self.output(h)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rope tables in place (works after to_empty)."""
        std = self.cfg.init_std
        if self.rope_cos is not None:
            cos, sin = rope_cos_sin(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta,
                                    device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, 0.0, std)
        if self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, 0.0, std)
        for layer in self.layers.values():
            layer.init_weights(std)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std)

    def aux_losses(self) -> torch.Tensor | None:
        """Weighted router balance + z losses of the last forward, summed over the MoE layers
        (None for a dense model); the training loss adds it (see moe.py)."""
        return moe_aux_loss(self)

    def moe_stats(self) -> dict[str, dict]:
        """Per MoE layer (`layers.<i>.feed_forward`): the router metrics of the last forward."""
        return moe_stats(self)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters (tied weights once). non_embedding drops the vocabulary and position
        matrices -- token and position embeddings and the output layer, tied or not -- as
        Kaplan et al. 2020 (section 2.1) count N."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for m in (self.tok_embeddings, self.pos_embeddings, self.output):
                if m is not None:
                    params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def num_active_params(self, non_embedding: bool = True) -> int:
        """Parameters one token uses: num_params less the E - k unchosen experts of each MoE
        layer (router and shared experts count). An upper bound: dropped tokens use fewer."""
        return (self.num_params(non_embedding)
                - sum(m.inactive_params() for m in moe_layers(self).values()))

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token of the whole model: 6 (N + d V) for the matmuls forward and
        backward, plus 12 L d T for attention scores (Kaplan et al. 2020 table 1; PaLM app. B).
        N counts the active parameters only (k of E experts, see num_active_params)."""
        c = self.cfg
        return (6 * (self.num_active_params(non_embedding=True) + c.d_model * c.vocab_size)
                + 12 * c.n_layers * c.d_model * seq_len)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """Build on the meta device (no memory), materialize on `device`, initialise."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    if cfg.tie_embeddings:  # to_empty allocates each module's parameter anew, untying them
        model.output.weight = model.tok_embeddings.weight
    model.init_weights()
    return model
