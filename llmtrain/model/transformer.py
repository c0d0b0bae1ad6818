"""Decoder-only Transformer (Vaswani et al. 2017) with Llama/torchtitan module names.

Each layer is x -> attn -> ffn, each sublayer with its norm (`attention_norm`, `ffn_norm`) placed
as `norm_position` says: pre, post, deepnorm (alpha = (2N)^(1/4) for N layers) or b2t, written
once in residual.py. Only pre-LN has a final norm (`norm`); for the others `norm` is None, as their
last layer already ends in an LN.

Variants (config keys of ModelConfig; each default leaves modules, names and math as above):
  norm: none          LN is the identity (with pre placement: x = x + f(x)).
  residual: rezero    x = x + alpha * f(norm(x)), one learned scalar alpha per layer (`resweight`)
                      starting at 0 for both sublayers, so every layer starts as the identity
                      (Bachlechner et al. 2020, "ReZero is All You Need", eq. 2 and their code).
  init: fixup         T-Fixup (Huang et al. 2020, "Improving Transformer Optimization Through
                      Better Initialization", section 3.3, decoder): no normalisation, Xavier
                      uniform weights, embeddings N(0, d^-1/2); v, output and FFN matrices and the
                      embeddings scaled by (9N)^(-1/4) for N layers.
  ln_scaling: inv_sqrt_depth  the outputs of layer l's norms (l = 1..N) times 1/sqrt(l) (Sun et
                      al. 2025, "The Curse of Depth in Large Language Models", LayerNorm Scaling).
  mixer               the attention sublayer replaced by a token mixer of mixers.py (`mixer`).
  embedding_dim: e    ALBERT's factorised embedding (Lan et al. 2020, section 3.1): tokens are
                      looked up in V x e (`tok_embeddings`) and projected e -> d
                      (`embedding_proj`); tied, the output is d -> e (`output_proj`) then the
                      e x V embedding transposed; untied, a plain d x V `output`.
  share_layers        one block's weights in every layer (ALBERT, section 3.1 "cross-layer
                      parameter sharing"; Universal Transformer, Dehghani et al. 2019, without
                      adaptive halting): `layers` holds the block once as layers["0"] and forward
                      applies it n_layers times, so state dict, checkpoint and parameter count
                      hold it once; flops_per_token counts n_layers applications.
  output: mos         Mixture of Softmaxes over `mos_k` components (output.py, `mos`); forward then
                      returns log-probabilities, which cross entropy reads as logits.
  qk_norm             RMSNorm on each head's queries and keys (attention.py, `q_norm`, `k_norm`).
  value_residual      ResFormer (attention.py): the first block's values V_1 are handed to every
                      later block (blocks then return (h, V_n); forward keeps the first).
  logit_softcap: c    output logits c * tanh(logits / c) (Gemma Team 2024, "Gemma 2", logit
                      soft-capping; transformers' final_logit_softcapping), also inside the
                      chunked and fused losses (train/lean_loss.py), which get c from forward.
  parametrization: mup  Yang et al. 2022 (Tensor Programs V, Table 8), model/mup.py: hidden
                      matrices start at std / sqrt(m), attention scores ~ 1/head_dim, the readout's
                      input times 1/m (m = d_model / base_d_model); at m = 1 the standard model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model.attention import Attention
from llmtrain.model.mixers import build_mixer
from llmtrain.model.mlp import FeedForward
from llmtrain.model.moe import MoE, moe_layers, moe_stats, aux_loss as moe_aux_loss
from llmtrain.model.mup import attention_scale, hidden_std, output_multiplier
from llmtrain.model.norms import build_norm
from llmtrain.model.output import MixtureOfSoftmaxes
from llmtrain.model.residual import deepnorm_alpha, deepnorm_beta, residual_layer
from llmtrain.model.rope import (dynamic_length, register_rope_tables, reset_rope_tables,
                                 rope_cos_sin)


def tfixup_scale(n_layers: int) -> float:
    """T-Fixup's decoder scale for N layers: (9N)^(-1/4) (Huang et al. 2020, section 3.3)."""
    return (9 * n_layers) ** -0.25


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, cfg: ModelConfig):
        super().__init__()
        self.layer_id = layer_id
        self.n_layers = cfg.n_layers
        self.norm_position = cfg.norm_position
        self.init = cfg.init
        # Sliding-window attention (Longformer, Beltagy et al. 2020; Mistral 7B): 0 = full. With
        # attention_global_every = n, layers n-1, 2n-1, ... attend fully, as Gemma 2 alternates
        # local and global layers (n = 2: layers 1, 3, ... global) -- the same counting as MoE's
        # every_n_layers.
        every = cfg.attention_global_every
        self.attention_window = (0 if every and (layer_id + 1) % every == 0
                                 else cfg.attention_window)
        if cfg.mixer == "attention":
            self.attention = Attention(cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.bias,
                                       cfg.dropout, cfg.norm_eps if cfg.qk_norm else None,
                                       cfg.value_residual, attention_scale(cfg))
            self.mixer = None
        else:
            self.attention = None
            self.mixer = build_mixer(cfg)
        # MoE in every n-th layer, counting from the last of each group (Switch: every other)
        moe = cfg.moe.num_experts > 0 and (layer_id + 1) % cfg.moe.every_n_layers == 0
        self.feed_forward = (MoE(cfg) if moe else
                             FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.bias))
        self.attention_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)  # residual dropout (Vaswani et al. 2017, 5.4)
        self.alpha = deepnorm_alpha(cfg.n_layers) if cfg.norm_position == "deepnorm" else 1.0
        self.resweight = nn.Parameter(torch.zeros(1)) if cfg.residual == "rezero" else None
        self.ln_scale = 1 / math.sqrt(layer_id + 1) if cfg.ln_scaling == "inv_sqrt_depth" else 1.0

    @property
    def token_mixer(self) -> nn.Module:
        """The attention sublayer's module: `attention`, or `mixer` for model.mixer != attention."""
        return self.attention if self.attention is not None else self.mixer

    def _sublayer(self, norm: nn.Module, f):
        """(norm, f) with LayerNorm Scaling on the norm's output and ReZero's alpha on f's (pre-LN
        only, the config checks): x + alpha * f(norm(x) / sqrt(l))."""
        scaled = norm if self.ln_scale == 1.0 else (lambda h: norm(h) * self.ln_scale)
        weighted = f if self.resweight is None else (lambda h: self.resweight * f(h))
        return scaled, weighted

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, first_values: torch.Tensor | None = None):
        """x -> x'; with value_residual (x, V_1 or None) -> (x', this block's values V_n)."""
        mixer = self.token_mixer
        value_residual = self.attention is not None and self.attention.value_residual
        values = []  # value_residual: this block's V_n, caught on its way out of the attention

        def mix(h):
            if not value_residual:
                return mixer(h, rope, mask)
            out, v = mixer(h, rope, mask, first_values)
            values.append(v)
            return out
        attn = self._sublayer(self.attention_norm, lambda h: self.dropout(mix(h)))
        ffn = self._sublayer(self.ffn_norm, lambda h: self.dropout(self.feed_forward(h)))
        out = residual_layer(self.norm_position, x, [attn, ffn], self.alpha)
        return (out, values[0]) if value_residual else out

    @torch.no_grad()
    def init_weights(self, std: float) -> None:
        mixer, f = self.token_mixer, self.feed_forward
        qk, inp, out = mixer.linears()  # attention: (wq, wk), (wv,), (wo,)
        moe = isinstance(f, MoE)
        w1, w2, w3 = (None, None, None) if moe else (f.w1, f.w2, f.w3)
        if self.norm_position == "deepnorm" or self.init == "fixup":
            # DeepNet pseudocode: xavier_normal(gain=1) for q, k; gain=beta for v, out and FFN.
            # T-Fixup: xavier_uniform, gain (9N)^(-1/4) for v, out and FFN.
            fixup = self.init == "fixup"
            beta = tfixup_scale(self.n_layers) if fixup else deepnorm_beta(self.n_layers)
            xavier = nn.init.xavier_uniform_ if fixup else nn.init.xavier_normal_
            gains = {**{q: 1.0 for q in qk}, **{w: beta for w in (*inp, *out, w1, w2, w3)}}
            for linear, gain in gains.items():
                if linear is not None:
                    xavier(linear.weight, gain=gain)
            if moe:  # the xavier_normal std of one d x f expert matrix at gain beta
                d, h = f.experts.w1.shape[1:]
                f.init_weights(beta * math.sqrt(2 / (d + h)), beta * math.sqrt(2 / (d + h)))
        else:
            # GPT-2 (Radford et al. 2019): pre-LN residual projections scaled by 1/sqrt(2N),
            # one factor per residual add (two per layer).
            out_std = std / math.sqrt(2 * self.n_layers) if self.norm_position == "pre" else std
            for linear in (*qk, *inp, w1, w3):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, std)
            for linear in (*out, w2):
                if linear is not None:
                    nn.init.normal_(linear.weight, 0.0, out_std)
            if moe:
                f.init_weights(std, out_std)
        for linear in (*qk, *inp, *out, w1, w2, w3):
            if linear is not None and linear.bias is not None:
                nn.init.zeros_(linear.bias)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        if self.attention is not None:
            self.attention.reset_parameters()  # QK-norm scales
        if not moe and f.poly is not None:
            f.poly.reset_parameters()  # PolyNorm / PolyReLU coefficients
        if self.mixer is not None:
            self.mixer.reset_parameters()
        if self.resweight is not None:
            nn.init.zeros_(self.resweight)  # ReZero: every layer starts as the identity


class Transformer(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab]. Pipeline stages may delete entries of `layers` or
    set `tok_embeddings` (input is then hidden states [B, T, D]), `norm` or `output` (hidden states
    are returned) to None."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        e = cfg.embedding_dim or cfg.d_model
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, e)
        self.embedding_proj = (nn.Linear(e, cfg.d_model, bias=False) if cfg.embedding_dim
                               else None)
        self.pos_embeddings = (nn.Embedding(cfg.max_seq_len, cfg.d_model)
                               if cfg.position == "learned" else None)
        n_blocks = 1 if cfg.share_layers else cfg.n_layers  # shared: layers["0"] runs n_layers times
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, cfg) for i in range(n_blocks)})
        self.norm = (build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                     if cfg.norm_position == "pre" else None)
        self.output_proj = (nn.Linear(cfg.d_model, e, bias=False)
                            if cfg.embedding_dim and cfg.tie_embeddings else None)
        self.output = nn.Linear(e if self.output_proj is not None else cfg.d_model,
                                cfg.vocab_size, bias=False)
        self.mos = MixtureOfSoftmaxes(cfg.d_model, cfg.mos_k) if cfg.output == "mos" else None
        if cfg.tie_embeddings:  # Press & Wolf 2017
            self.output.weight = self.tok_embeddings.weight
        self.readout_scale = output_multiplier(cfg)  # muP's 1/m (model/mup.py); 1 standard
        register_rope_tables(self, cfg)

    def forward(self, tokens: torch.Tensor, doc_ids: torch.Tensor | None = None,
                head=None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """`doc_ids` [B, S]: document index of every token of the sequences, for the block-diagonal
        mask; S = T, or the whole sequence where `tokens` hold a part of it (context parallelism
        attends over all S). The sequence length S of the masks (document, sliding window) and of
        dynamic NTK's rope is doc_ids.shape[1] when doc_ids is given, else T: a caller whose
        `tokens` are a part of the sequence passes doc_ids when the model has an attention window
        or dynamic NTK (zeros for a single document). `positions` [T] or [B, T]: the position of
        each token for rope or learned positions (default 0..T-1). `head(h, output)`, if given,
        stands in for the output layer: it gets the final hidden states (after `output_proj`) and
        the output module, and its result is returned (the chunked or fused loss of lean_loss.py,
        which never holds the [B, T, V] logits), given `softcap` = model.logit_softcap to
        apply to its logits too."""
        T = tokens.shape[1]
        S = T if doc_ids is None else doc_ids.shape[1]
        if self.tok_embeddings is None:
            h = tokens
        else:
            h = self.tok_embeddings(tokens)
            if self.embedding_proj is not None:
                h = self.embedding_proj(h)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(torch.arange(T, device=h.device)
                                            if positions is None else positions)
        rope = self._rope(T, S, positions, h.device)
        masks = {w: self._mask(w, S, doc_ids, h.device)
                 for w in {layer.attention_window for layer in self.blocks()}}
        first_values = None  # value_residual: V_1, the first block's values
        for layer in self.blocks():
            mask = masks[layer.attention_window]
            if self.cfg.value_residual:
                h, values = layer(h, rope, mask, first_values)
                first_values = values if first_values is None else first_values
            else:
                h = layer(h, rope, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        if self.readout_scale != 1.0:
            # muP's logit multiplier 1/m on the readout's input: the readout is linear and
            # bias-free, so this is (W h) / m for every path below (the lean losses' head too)
            h = h * self.readout_scale
        if head is not None:
            return head(h if self.output_proj is None else self.output_proj(h), self.output,
                        softcap=self.cfg.logit_softcap)
        if self.mos is not None:
            latents, log_prior = self.mos(h)
            return self.mos.mix(self._logits(latents), log_prior)
        return self._logits(h)

    def _rope(self, T: int, S: int, positions: torch.Tensor | None, device):
        """(cos, sin) of the T tokens, or None without rope. Dynamic NTK beyond its pretraining
        length: the tables of an S-token sequence, computed here (its base depends on S)."""
        if self.rope_cos is None:
            return None
        cos, sin = self.rope_cos, self.rope_sin
        if dynamic_length(self.cfg, S):
            c = self.cfg
            cos, sin = rope_cos_sin(c.head_dim, S, c.rope_theta, device, c.rope_scaling)
        return (cos[:T], sin[:T]) if positions is None else (cos[positions], sin[positions])

    @staticmethod
    def _mask(window: int, S: int, doc_ids: torch.Tensor | None, device) -> torch.Tensor | None:
        """[B or 1, 1, S, S] bool, True = attend: causal, within the document (doc_ids) and, for
        window w > 0, to the w latest positions t-w+1..t (Mistral's sliding window); None for the
        plain causal mask (SDPA's is_causal path)."""
        local = 0 < window < S
        if doc_ids is None and not local:
            return None
        pos = torch.arange(S, device=device)
        q, k = pos[:, None], pos[None, :]  # compared by broadcasting: no [S, S] integer tensor
        mask = (k <= q) & (k > q - window) if local else k <= q
        if doc_ids is not None:  # block-diagonal causal: attend only within the same document
            mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & mask
        return mask[None, None] if mask.dim() == 2 else mask[:, None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.output(h if self.output_proj is None else self.output_proj(h))
        c = self.cfg.logit_softcap
        return logits if not c else c * torch.tanh(logits / c)

    def blocks(self) -> list[TransformerBlock]:
        """The blocks in the order forward applies them (share_layers: layers["0"] n_layers
        times)."""
        if self.cfg.share_layers:
            return [self.layers["0"]] * self.cfg.n_layers
        return list(self.layers.values())

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rope tables in place (works after to_empty)."""
        std = self.cfg.init_std
        reset_rope_tables(self, self.cfg)
        if self.tok_embeddings is not None:
            emb_std = (self.cfg.d_model ** -0.5 * tfixup_scale(self.cfg.n_layers)
                       if self.cfg.init == "fixup" else std)  # T-Fixup: N(0, d^-1/2) (9N)^-1/4
            nn.init.normal_(self.tok_embeddings.weight, 0.0, emb_std)
        if self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, 0.0, std)
        for layer in self.layers.values():
            layer.init_weights(hidden_std(self.cfg, std))  # muP: variance ~ 1/fan_in
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, 0.0, std)
        for proj in (self.embedding_proj, self.output_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, 0.0, std)
        if self.mos is not None:
            self.mos.reset_parameters(std)

    def aux_losses(self) -> torch.Tensor | None:
        """Weighted router balance + z losses of the last forward, summed over the MoE layers
        (None for a dense model); the training loss adds it (see moe.py)."""
        return moe_aux_loss(self)

    def moe_stats(self) -> dict[str, dict]:
        """Per MoE layer (`layers.<i>.feed_forward`): the router metrics of the last forward."""
        return moe_stats(self)

    def num_params(self, non_embedding: bool = True) -> int:
        """Unique parameters (tied weights once). non_embedding drops the vocabulary and position
        matrices -- token and position embeddings and the output layer, tied or not, and the
        projections of a factorised embedding -- as Kaplan et al. 2020 (section 2.1) count N.
        Shared layers (share_layers) count once."""
        params = {id(p): p for p in self.parameters()}
        if non_embedding:
            for m in (self.tok_embeddings, self.pos_embeddings, self.output, self.embedding_proj,
                      self.output_proj):
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
        N counts the active parameters only (k of E experts, see num_active_params), a shared
        block once per application. Variants: other mixers replace 12 d T by their own mixing
        term (mixers.py) and their [L, L] weights leave N; the output term is d V per softmax
        (K of them for MoS) plus the factorised embedding's projections."""
        c = self.cfg
        n = self.num_active_params(non_embedding=True)
        blocks = self.blocks()
        if c.share_layers:
            n += (len(blocks) - 1) * sum(p.numel() for p in blocks[0].parameters())
        n -= sum(b.token_mixer.mixing_params() for b in blocks)
        head = c.mos_k if c.output == "mos" else 1
        out = head * (c.embedding_dim if self.output_proj is not None else c.d_model) * c.vocab_size
        out += sum(p.weight.numel() for p in (self.embedding_proj, self.output_proj)
                   if p is not None)
        return 6 * (n + out) + sum(b.token_mixer.mixing_flops_per_token(seq_len) for b in blocks)
