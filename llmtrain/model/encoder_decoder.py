"""Encoder-decoder Transformer (Vaswani et al. 2017; T5, Raffel et al. 2020), `model.arch:
encoder_decoder`, built from the same parts as the decoder-only stack (transformer.py).

  encoder layer  x = x + attn(x)                 bidirectional; source padding masked
  decoder layer  x = x + attn(x)                 causal
                 x = x + cross_attn(x, memory)   queries from the decoder, keys/values from the
                                                 encoder output; source padding masked
                 x = x + ffn(x)
with each `+` placed as `norm_position` says (residual.py, shared with the decoder-only block):
pre, post, deepnorm (with the encoder-decoder constants of DeepNet, Wang et al. 2022, section 4.1)
or b2t (the layer input bypasses every LN of the layer but the last). Positions: rope / learned
(one table per stack) / sinusoidal (added to embeddings * sqrt(d_model), Vaswani et al. 2017,
3.4-3.5) / t5_relative (one bucketed bias table per stack, shared by its layers; SDPA's
1/sqrt(head_dim) scaling is kept, which T5 folds into its init) / none. Cross-attention gets no
position information, as in both papers. With tie_embeddings one `tok_embeddings` matrix is the
encoder input, decoder input and output projection (T5); without, each has its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.attention import Attention
from llmtrain.model.mlp import FeedForward
from llmtrain.model.moe import MoE, aux_loss, moe_layers, moe_stats
from llmtrain.model.mup import attention_scale, hidden_std, output_multiplier
from llmtrain.model.norms import build_norm
from llmtrain.model.positions import RelativePositionBias, sinusoidal_table
from llmtrain.model.residual import (deepnorm_decoder_alpha, deepnorm_decoder_beta,
                                     deepnorm_encoder_alpha, deepnorm_encoder_beta, residual_layer)
from llmtrain.model.rope import register_rope_tables, reset_rope_tables


class CrossAttention(Attention):
    """Attention's projections (same names, so tensor-parallel plans apply) with queries from `x`
    [B, T, D] and keys/values from `memory` [B, S, D]; `mask` [B, 1, 1, S] bool (True = attend)."""

    def forward(self, x: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        S = memory.shape[1]
        q = self.wq(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.wk(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        v = self.wv(memory).view(B, S, -1, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.core.dropout if self.training else 0.0,
            enable_gqa=k.shape[1] != q.shape[1], scale=self.core.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class EncoderDecoderBlock(nn.Module):
    """An encoder layer (cross=False) or a decoder layer (cross=True)."""

    def __init__(self, layer_id: int, cfg: ModelConfig, cross: bool, alpha: float = 1.0,
                 beta: float = 1.0):
        super().__init__()
        self.norm_position = cfg.norm_position
        self.alpha, self.beta = alpha, beta
        scale = attention_scale(cfg)  # None: SDPA's 1/sqrt(head_dim); muP: model/mup.py
        self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.bias, cfg.dropout,
                                   scale=scale)
        self.cross_attention = (CrossAttention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.bias,
                                               cfg.dropout, scale=scale) if cross else None)
        # MoE in every n-th layer of each stack, as transformer.py (Switch: every other)
        moe = cfg.moe.num_experts > 0 and (layer_id + 1) % cfg.moe.every_n_layers == 0
        self.feed_forward = (MoE(cfg) if moe else
                             FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.bias))
        self.attention_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.cross_attention_norm = (build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                                     if cross else None)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)  # residual dropout (Vaswani et al. 2017, 5.4)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None, memory: torch.Tensor | None = None,
                cross_mask: torch.Tensor | None = None) -> torch.Tensor:
        dropout = self.dropout
        sublayers = [(self.attention_norm, lambda h: dropout(self.attention(h, rope, mask)))]
        if self.cross_attention is not None:
            sublayers.append((self.cross_attention_norm,
                              lambda h: dropout(self.cross_attention(h, memory, cross_mask))))
        sublayers.append((self.ffn_norm, lambda h: dropout(self.feed_forward(h))))
        return residual_layer(self.norm_position, x, sublayers, self.alpha)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        """DeepNorm: xavier_normal, gain 1 on q, k and beta on v, out and FFN (DeepNet
        pseudocode); otherwise normal(std), with out_std on the projections that write into the
        residual stream (wo, w2)."""
        deep = self.norm_position == "deepnorm"
        plan = []  # (linear, deepnorm gain, std otherwise)
        for a in (self.attention, self.cross_attention):
            if a is not None:
                plan += [(a.wq, 1.0, std), (a.wk, 1.0, std), (a.wv, self.beta, std),
                         (a.wo, self.beta, out_std)]
        f = self.feed_forward
        if isinstance(f, MoE):  # deepnorm: the xavier_normal std of one d x f expert matrix
            d, h = f.experts.w1.shape[1:]
            xavier = self.beta * math.sqrt(2 / (d + h))
            f.init_weights(*((xavier, xavier) if deep else (std, out_std)))
        else:
            plan += [(f.w1, self.beta, std), (f.w3, self.beta, std), (f.w2, self.beta, out_std)]
        for linear, gain, s in plan:
            if linear is None:
                continue
            if deep:
                nn.init.xavier_normal_(linear.weight, gain=gain)
            else:
                nn.init.normal_(linear.weight, 0.0, s)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        for norm in (self.attention_norm, self.cross_attention_norm, self.ffn_norm):
            if norm is not None:
                norm.reset_parameters()


class Stack(nn.Module):
    """The encoder (causal=False) or decoder (causal=True): per-stack embeddings when untied,
    per-stack position tables, `layers` keyed "0".."N-1", final `norm` for pre-LN."""

    def __init__(self, cfg: ModelConfig, n_layers: int, causal: bool, alpha: float, beta: float,
                 own_embeddings: bool):
        super().__init__()
        self.causal = causal
        self.tok_embeddings = (nn.Embedding(cfg.vocab_size, cfg.d_model) if own_embeddings
                               else None)
        self.pos_embeddings = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                               if cfg.position == "learned" else None)
        self.relative_bias = (RelativePositionBias(cfg.n_heads, bidirectional=not causal)
                              if cfg.position == "t5_relative" else None)
        self.dropout = nn.Dropout(cfg.dropout)  # on embeddings + positions (Vaswani 5.4)
        self.layers = nn.ModuleDict({str(i): EncoderDecoderBlock(i, cfg, causal, alpha, beta)
                                     for i in range(n_layers)})
        self.norm = (build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                     if cfg.norm_position == "pre" else None)

    def forward(self, h: torch.Tensor, rope, src_pad_mask: torch.Tensor | None,
                memory: torch.Tensor | None = None) -> torch.Tensor:
        """h: embedded input [B, L, D]; src_pad_mask [B, S] bool (True = real source token)."""
        L = h.shape[1]
        keep = None if src_pad_mask is None else src_pad_mask[:, None, None, :]
        if self.causal:
            mask, cross_mask = None, keep  # mask None: Attention applies the causal mask
            if self.relative_bias is not None:
                causal = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
                mask = self.relative_bias(L, L).masked_fill(~causal, float("-inf"))
        else:
            cross_mask = None
            # an explicit mask, never None: Attention reads None as causal
            mask = keep if keep is not None else torch.ones(1, 1, 1, L, dtype=torch.bool,
                                                            device=h.device)
            if self.relative_bias is not None:
                mask = self.relative_bias(L, L).masked_fill(~mask, float("-inf"))
        for layer in self.layers.values():
            h = layer(h, rope, mask, memory, cross_mask)
        return h if self.norm is None else self.norm(h)


class EncoderDecoder(nn.Module):
    """(src_tokens [B, S], tgt_tokens [B, T], src_pad_mask [B, S] bool) -> logits [B, T, vocab].
    `tgt_tokens` are the decoder inputs (targets shifted right behind a start token)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        N, M = cfg.n_encoder_layers, cfg.n_decoder_layers
        deep = cfg.norm_position == "deepnorm"
        enc = (deepnorm_encoder_alpha(N, M), deepnorm_encoder_beta(N, M)) if deep else (1.0, 1.0)
        dec = (deepnorm_decoder_alpha(M), deepnorm_decoder_beta(M)) if deep else (1.0, 1.0)
        tied = cfg.tie_embeddings
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model) if tied else None
        self.encoder = Stack(cfg, N, False, *enc, own_embeddings=not tied)
        self.decoder = Stack(cfg, M, True, *dec, own_embeddings=not tied)
        self.output = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight
        self.readout_scale = output_multiplier(cfg)  # muP's 1/m (model/mup.py); 1 standard
        register_rope_tables(self, cfg)
        if cfg.position == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, cfg.d_model),
                                 persistent=False)
        else:
            self.pos_table = None

    def _embed(self, stack: Stack, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        emb = stack.tok_embeddings if self.tok_embeddings is None else self.tok_embeddings
        h = emb(tokens)
        if self.pos_table is not None:
            h = h * math.sqrt(self.cfg.d_model) + self.pos_table[:L].to(h.dtype)
        if stack.pos_embeddings is not None:
            h = h + stack.pos_embeddings(torch.arange(L, device=h.device))
        return stack.dropout(h)

    def _rope(self, L: int):
        return None if self.rope_cos is None else (self.rope_cos[:L], self.rope_sin[:L])

    def encode(self, src_tokens: torch.Tensor,
               src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder output [B, S, D]."""
        return self.encoder(self._embed(self.encoder, src_tokens), self._rope(src_tokens.shape[1]),
                            src_pad_mask)

    def decode(self, tgt_tokens: torch.Tensor, memory: torch.Tensor,
               src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] given the encoder output `memory`."""
        h = self.decoder(self._embed(self.decoder, tgt_tokens), self._rope(tgt_tokens.shape[1]),
                         src_pad_mask, memory)
        if self.readout_scale != 1.0:  # muP: (W h) / m as W (h / m), see transformer.py
            h = h * self.readout_scale
        return self.output(h)

    def forward(self, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor,
                src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tgt_tokens, self.encode(src_tokens, src_pad_mask), src_pad_mask)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer in place (works after to_empty)."""
        c, std = self.cfg, self.cfg.init_std
        hidden = hidden_std(c, std)  # muP: hidden matrices' variance ~ 1/fan_in (model/mup.py)
        reset_rope_tables(self, c)
        if self.pos_table is not None:
            self.pos_table.copy_(sinusoidal_table(c.max_seq_len, c.d_model,
                                                  device=self.pos_table.device))
        for emb in (self.tok_embeddings, self.encoder.tok_embeddings, self.decoder.tok_embeddings):
            if emb is not None:
                nn.init.normal_(emb.weight, 0.0, std)
        for stack, sublayers in ((self.encoder, 2), (self.decoder, 3)):
            if stack.pos_embeddings is not None:
                nn.init.normal_(stack.pos_embeddings.weight, 0.0, std)
            if stack.relative_bias is not None:
                stack.relative_bias.reset_parameters(std)
            # GPT-2's 1/sqrt(number of residual adds) for pre-LN, per stack
            out_std = (hidden / math.sqrt(sublayers * len(stack.layers))
                       if c.norm_position == "pre" else hidden)
            for layer in stack.layers.values():
                layer.init_weights(hidden, out_std)
            if stack.norm is not None:
                stack.norm.reset_parameters()
        if not c.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std)

    def _embedding_modules(self) -> list[nn.Module]:
        mods = [self.tok_embeddings, self.output]
        for stack in (self.encoder, self.decoder):
            mods += [stack.tok_embeddings, stack.pos_embeddings]
            if stack.relative_bias is not None:
                mods.append(stack.relative_bias.relative_attention_bias)
        return [m for m in mods if m is not None]

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters (tied weights once); non_embedding drops the vocabulary and position
        matrices (token, learned-position and relative-bias tables, output), as Kaplan et al."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for m in self._embedding_modules():
                params.pop(id(m.weight), None)
        return sum(p.numel() for p in params.values())

    def num_active_params(self, non_embedding: bool = True) -> int:
        """num_params less the E - k unchosen experts of each MoE layer (see moe.py)."""
        return (self.num_params(non_embedding)
                - sum(m.inactive_params() for m in moe_layers(self).values()))

    def aux_losses(self) -> torch.Tensor | None:
        """Weighted router losses of the last forward over all MoE layers (None when dense)."""
        return aux_loss(self)

    def moe_stats(self) -> dict[str, dict]:
        """Per MoE layer (`encoder.layers.<i>.feed_forward`, ...): last forward's router metrics."""
        return moe_stats(self)

    def flops_per_token(self, seq_len: int, src_len: int | None = None) -> int:
        """Training FLOPs per *target* token for targets of `seq_len` and sources of `src_len`
        (default: seq_len) tokens: 6 x the active parameters each token passes through (the
        encoder's weighted by src_len / seq_len) plus the output layer, and 12 d x attended length
        per attention layer (PaLM app. B): encoder self (src_len), decoder self (seq_len) and
        cross (src_len)."""
        c = self.cfg
        S, T = src_len or seq_len, seq_len

        def active(stack: Stack) -> int:
            n = sum(p.numel() for p in stack.layers.parameters())
            n += sum(p.numel() for p in stack.norm.parameters()) if stack.norm is not None else 0
            return n - sum(m.inactive_params() for m in moe_layers(stack).values())

        matmul = 6 * (active(self.encoder) * S / T + active(self.decoder)
                      + c.d_model * c.vocab_size)
        attention = 12 * c.d_model * (c.n_encoder_layers * S * S / T
                                      + c.n_decoder_layers * (T + S))
        return int(matmul + attention)
