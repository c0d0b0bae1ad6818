"""Model tests: each compares against a reference (a formula, a hand-written layer, or
Hugging Face `LlamaForCausalLM`)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import seeded_model, tiny_model_config, tokens
from llmtrain.config import ModelConfig
from llmtrain.model import (Transformer, apply_rope, build_model, deepnorm_alpha, deepnorm_beta,
                            rope_cos_sin)

NORM_POSITIONS = ["pre", "post", "deepnorm", "b2t"]
POSITIONS = ["rope", "learned", "none"]


def make(seed: int = 0, **kw) -> Transformer:
    return seeded_model(tiny_model_config(**kw), seed)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_causal(norm_position, position):
    model = make(norm_position=norm_position, position=position, norm="layernorm", bias=True,
                 activation="gelu")
    x = tokens(2, 12)
    t = 7
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % 61
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 12, 61)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4  # every later position sees it


@pytest.mark.parametrize("position", ["rope", "none"])
def test_doc_ids_block_diagonal(position):
    model = make(position=position)
    first, second = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids)
        unmasked = model(packed)
        alone1, alone2 = model(first), model(second)
    torch.testing.assert_close(masked[:, :5], alone1, rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[:, 5:], alone2, rtol=0, atol=1e-5)
    assert (unmasked[:, 5:] - alone2).abs().max() > 1e-3  # without doc_ids the docs do mix
    # one document everywhere: the explicit mask path equals the is_causal path
    with torch.no_grad():
        same = model(packed, doc_ids=torch.zeros_like(packed))
    torch.testing.assert_close(same, unmasked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [2, 1])  # GQA, MQA
def test_gqa_equals_mha_with_repeated_kv(n_kv_heads):
    gqa = make(n_heads=4, n_kv_heads=n_kv_heads)
    mha = make(n_heads=4, n_kv_heads=None)
    rep, hd = 4 // n_kv_heads, gqa.cfg.head_dim
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("attention.wk.weight", "attention.wv.weight")):
            assert w.shape == (n_kv_heads * hd, 32)
            # kv head j serves query heads j*rep .. j*rep+rep-1 (Hugging Face repeat_kv order)
            state[name] = w.view(n_kv_heads, hd, 32).repeat_interleave(rep, 0).reshape(-1, 32)
    mha.load_state_dict(state)
    x = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-5)


def test_heads_follow_weight_shapes():
    """A tensor-parallel shard holds a slice of the heads; attention must run on it."""
    model = make(n_heads=4, n_kv_heads=2)
    attn = model.layers["0"].attention
    hd = model.cfg.head_dim
    x = torch.randn(2, 6, 32)
    full = attn(x)
    halves = []
    for r in range(2):  # column-shard wq/wk/wv, row-shard wo, like Colwise/RowwiseParallel
        shard = copy.deepcopy(attn)
        qs, kvs = slice(r * 2 * hd, (r + 1) * 2 * hd), slice(r * hd, (r + 1) * hd)
        shard.wq.weight.data = attn.wq.weight[qs].clone()
        shard.wk.weight.data = attn.wk.weight[kvs].clone()
        shard.wv.weight.data = attn.wv.weight[kvs].clone()
        shard.wo.weight.data = attn.wo.weight[:, qs].clone()
        halves.append(shard(x))
    torch.testing.assert_close(halves[0] + halves[1], full, rtol=0, atol=1e-5)


def test_rope_depends_on_relative_position_only():
    hd = 16
    cos, sin = rope_cos_sin(hd, 64, theta=10000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd, generator=g), torch.randn(1, 1, 1, hd, generator=g)

    def score(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1])
                * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum().item()

    for m, n in [(5, 2), (9, 9), (3, 11)]:
        for shift in (1, 17, 40):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # and it does depend on the offset
    # rotation preserves norms and is the identity at position 0
    torch.testing.assert_close(apply_rope(q, cos[:1], sin[:1]), q)


def test_deepnorm_constants():
    for n in (1, 6, 12, 100):
        assert deepnorm_alpha(n) == pytest.approx((2 * n) ** 0.25)
        assert deepnorm_beta(n) == pytest.approx((8 * n) ** -0.25)
    assert deepnorm_alpha(8) == pytest.approx(2.0)  # (2*8)^(1/4)
    assert deepnorm_beta(2) == pytest.approx(0.5)  # (8*2)^(-1/4)
    model = make(norm_position="deepnorm", n_layers=3)
    assert model.layers["1"].alpha == pytest.approx(6 ** 0.25)
    assert make(norm_position="post").layers["0"].alpha == 1.0


def _std(w: torch.Tensor) -> float:
    return w.detach().float().std().item()


def test_init_scales():
    d, L, std = 128, 4, 0.02
    pre = make(d_model=d, n_heads=4, n_layers=L, init_std=std, bias=True, norm="layernorm")
    blk = pre.layers["0"]
    assert _std(blk.attention.wq.weight) == pytest.approx(std, rel=0.05)
    assert _std(blk.attention.wo.weight) == pytest.approx(std / math.sqrt(2 * L), rel=0.05)
    assert _std(blk.feed_forward.w2.weight) == pytest.approx(std / math.sqrt(2 * L), rel=0.05)
    assert _std(pre.tok_embeddings.weight) == pytest.approx(std, rel=0.05)
    assert blk.attention.wq.bias.abs().max() == 0 and blk.ffn_norm.bias.abs().max() == 0
    assert (blk.attention_norm.weight == 1).all()
    post = make(d_model=d, n_layers=L, norm_position="post")
    assert _std(post.layers["0"].attention.wo.weight) == pytest.approx(std, rel=0.05)
    deep = make(d_model=d, n_layers=L, norm_position="deepnorm", activation="swiglu")
    beta, a, f = deepnorm_beta(L), deep.layers["0"].attention, deep.layers["0"].feed_forward

    def xavier(w, gain):  # xavier_normal std = gain * sqrt(2 / (fan_in + fan_out))
        return gain * math.sqrt(2.0 / sum(w.shape))

    for w, gain in [(a.wq.weight, 1.0), (a.wk.weight, 1.0), (a.wv.weight, beta),
                    (a.wo.weight, beta), (f.w1.weight, beta), (f.w2.weight, beta),
                    (f.w3.weight, beta)]:
        assert _std(w) == pytest.approx(xavier(w, gain), rel=0.05)


@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_residual_placement_matches_formula(norm_position):
    model = make(norm_position=norm_position, n_layers=3, norm="layernorm")
    blk = model.layers["1"]
    # perturb norm weights so LN(x) is not just a standardization
    with torch.no_grad():
        blk.attention_norm.weight.normal_(1.0, 0.3)
        blk.ffn_norm.weight.normal_(1.0, 0.3)
    rope = (model.rope_cos[:9], model.rope_sin[:9])
    attn = lambda h: blk.attention(h, rope)  # noqa: E731
    ffn, ln1, ln2 = blk.feed_forward, blk.attention_norm, blk.ffn_norm
    x = torch.randn(2, 9, 32)
    if norm_position == "pre":
        h = x + attn(ln1(x))
        ref = h + ffn(ln2(h))
    elif norm_position == "post":
        h = ln1(x + attn(x))
        ref = ln2(h + ffn(h))
    elif norm_position == "deepnorm":
        alpha = (2 * 3) ** 0.25
        h = ln1(alpha * x + attn(x))
        ref = ln2(alpha * h + ffn(h))
    else:  # b2t, Takase et al. 2022 eq. 4
        h = ln1(x + attn(x))
        ref = ln2(h + ffn(h) + x)
    torch.testing.assert_close(blk(x, rope), ref, rtol=0, atol=1e-6)
    assert (model.norm is not None) == (norm_position == "pre")


def test_meta_build_tied_and_init():
    cfg = tiny_model_config(tie_embeddings=True)
    with torch.device("meta"):
        meta = Transformer(cfg)
    assert meta.output.weight.is_meta and meta.output.weight is meta.tok_embeddings.weight
    model = build_model(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert all(p.device.type == "cpu" for p in model.parameters())
    cos, sin = rope_cos_sin(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    torch.testing.assert_close(model.rope_cos, cos)
    torch.testing.assert_close(model.rope_sin, sin)
    assert "rope_cos" not in model.state_dict()  # non-persistent
    out = model(tokens(2, 24))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # init_weights re-initialises in place: same seed, same weights
    torch.manual_seed(5)
    model.init_weights()
    w = model.layers["0"].attention.wq.weight.clone()
    torch.manual_seed(5)
    model.init_weights()
    torch.testing.assert_close(model.layers["0"].attention.wq.weight, w, rtol=0, atol=0)
    untied = build_model(tiny_model_config(tie_embeddings=False))
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("kw", [
    dict(activation="swiglu", norm="rmsnorm", bias=False, tie_embeddings=True, n_kv_heads=2),
    dict(activation="gelu", norm="layernorm", bias=True, tie_embeddings=False,
         position="learned"),
    dict(activation="geglu", norm="layernorm", bias=False, tie_embeddings=True,
         norm_position="post", d_ff=40),
])
def test_num_params_and_flops(kw):
    cfg = tiny_model_config(**kw)
    model = build_model(cfg)
    d, V, L, f, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.ffn_dim, cfg.head_dim
    kv = cfg.kv_heads * hd
    b = cfg.bias
    norm = d * (2 if cfg.norm == "layernorm" and b else 1)
    glu = cfg.activation != "gelu"
    attn = 2 * d * d + 2 * d * kv + (b and d + 2 * kv + d)
    mlp = (3 if glu else 2) * d * f + (b and (2 if glu else 1) * f + d)
    final = norm if cfg.norm_position == "pre" else 0
    n = L * (attn + mlp + 2 * norm) + final
    embed = V * d * (1 if cfg.tie_embeddings else 2)
    embed += cfg.max_seq_len * d if cfg.position == "learned" else 0
    assert model.num_params() == n
    assert model.num_params(non_embedding=False) == n + embed
    assert model.num_params(non_embedding=False) == len(torch.cat(
        [p.flatten() for p in model.parameters()]))  # parameters() yields tied weights once
    assert model.flops_per_token(16) == 6 * (n + d * V) + 12 * L * d * 16


def test_pipeline_stages_compose():
    model = make(n_layers=4, tie_embeddings=False)
    first, last = copy.deepcopy(model), copy.deepcopy(model)
    for i in ("2", "3"):
        del first.layers[i]
    for i in ("0", "1"):
        del last.layers[i]
    first.norm = first.output = None
    last.tok_embeddings = None
    x, doc = tokens(2, 10), torch.tensor([[0] * 4 + [1] * 6] * 2)
    with torch.no_grad():
        h = first(x, doc_ids=doc)
        assert h.shape == (2, 10, 32)
        torch.testing.assert_close(last(h, doc_ids=doc), model(x, doc_ids=doc), rtol=0, atol=1e-6)


def test_feed_forward_activations():
    x = torch.randn(3, 32)
    for act, ref in [("gelu", lambda m: m.w2(F.gelu(m.w1(x)))),
                     ("swiglu", lambda m: m.w2(F.silu(m.w1(x)) * m.w3(x))),
                     ("geglu", lambda m: m.w2(F.gelu(m.w1(x)) * m.w3(x)))]:
        ff = make(activation=act).layers["0"].feed_forward
        assert (ff.w3 is None) == (act == "gelu")
        assert ff.w1.out_features == tiny_model_config(activation=act).ffn_dim
        torch.testing.assert_close(ff(x), ref(ff))


def test_dropout_only_in_training():
    model = make(dropout=0.3)
    x = tokens(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
        model.train()
        assert (model(x) - model(x)).abs().max() > 1e-4


def test_matches_hf_llama():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=101,
                      max_seq_len=32, norm="rmsnorm", norm_eps=1e-6, norm_position="pre",
                      position="rope", rope_theta=500000.0, activation="swiglu", bias=False,
                      tie_embeddings=False)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights so a swapped norm would show
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, hidden_act="silu", attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    top = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
    sub = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
           "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
           "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
           "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
           "ffn_norm": "post_attention_layernorm"}
    state = {}
    for key, value in ours.state_dict().items():
        module, param = key.rsplit(".", 1)
        if module.startswith("layers."):
            _, i, name = module.split(".", 2)
            module = f"model.layers.{i}.{sub[name]}"
        else:
            module = top[module]
        state[f"{module}.{param}"] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    x = tokens(2, 32, vocab=101)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_explicit_positions(position):
    """`positions` places the tokens: 0..T-1 is the default; per-sequence positions [B, T] act on
    each row; a shift of every position leaves a rope model's output unchanged (rope scores depend
    on the distance only, Su et al. 2021 section 3.4.2) but changes a learned-position model's."""
    m = seeded_model(tiny_model_config(position=position))
    x = tokens(2, 16)
    ref = m(x)
    arange = torch.arange(16)
    torch.testing.assert_close(m(x, positions=arange), ref, rtol=0, atol=0)
    rows = torch.stack([arange, arange + 5])
    out = m(x, positions=rows)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    shifted = m(x[1:], positions=arange + 5)
    torch.testing.assert_close(out[1:], shifted, rtol=1e-6, atol=1e-6)
    if position == "rope":
        torch.testing.assert_close(shifted, ref[1:], rtol=1e-4, atol=1e-4)
    else:
        assert (shifted - ref[1:]).abs().max() > 1e-3
