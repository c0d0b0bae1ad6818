"""Architecture variants (model.activation, norm, residual, init, ln_scaling, embedding_dim,
share_layers, output, mixer), each checked against its paper's definition: a formula, an
identity at initialisation, a parameter count, causality."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (cli_train, one_thread, read_losses, read_summary, run_dir_of, run_train,
                     seeded_model, tiny_model_config, tokens)
from llmtrain.config import ConfigError, ModelConfig, load_config
from llmtrain.model import FeedForward, tfixup_scale

MIXERS = ["gmlp", "synthesizer_dense", "synthesizer_random"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{"n_layers": 3, **kw})


def make(seed: int = 0, **kw):
    return seeded_model(cfg(**kw), seed)


def n_params(model) -> int:
    return model.num_params(non_embedding=False)


# ---- activations (Shazeer 2020 for the GLU family)

FORMULAS = {
    "relu": lambda a, b: F.relu(a), "gelu": lambda a, b: F.gelu(a),
    "silu": lambda a, b: a * torch.sigmoid(a), "selu": lambda a, b: F.selu(a),
    "elu": lambda a, b: torch.where(a > 0, a, torch.exp(a) - 1),
    "glu": lambda a, b: torch.sigmoid(a) * b, "reglu": lambda a, b: a.clamp(min=0) * b,
    "geglu": lambda a, b: 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * b,
    "swiglu": lambda a, b: a * torch.sigmoid(a) * b,
}


@pytest.mark.parametrize("activation", list(FORMULAS))
def test_activation_matches_formula(activation):
    torch.manual_seed(0)
    ff = FeedForward(8, 16, activation)
    x = torch.randn(5, 8)
    a = x @ ff.w1.weight.T
    b = x @ ff.w3.weight.T if ff.w3 is not None else None
    assert (ff.w3 is not None) == (activation in ("glu", "reglu", "geglu", "swiglu"))
    torch.testing.assert_close(ff(x), FORMULAS[activation](a, b) @ ff.w2.weight.T)


def test_glu_family_default_width_and_given_width():
    assert cfg(activation="reglu").ffn_dim == cfg(activation="swiglu").ffn_dim == 88  # 8/3 * 32
    assert cfg(activation="relu").ffn_dim == 128
    assert cfg(activation="glu", d_ff=40).ffn_dim == 40  # d_ff is the hidden width as given


# ---- residual and normalisation

@pytest.mark.parametrize("norm", ["rmsnorm", "none"])
def test_rezero_is_identity_at_init(norm):
    model = make(residual="rezero", norm=norm, position="none")
    x = torch.randn(2, 7, 32)
    for block in model.layers.values():
        assert block.resweight.item() == 0.0
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    with torch.no_grad():  # the whole stack: the logits of the (normed) embeddings
        h = model.norm(model.tok_embeddings(tokens(2, 7)))
        torch.testing.assert_close(model(tokens(2, 7)), model.output(h))
    block = model.layers["0"]
    with torch.no_grad():
        block.resweight.fill_(0.5)
    assert not torch.allclose(block(x), x)  # and alpha does switch the branches on


def test_ln_scaling_is_inv_sqrt_depth():
    model = make(ln_scaling="inv_sqrt_depth")
    for i, block in enumerate(model.layers.values()):
        assert block.ln_scale == pytest.approx(1 / math.sqrt(i + 1))
    # layer 3's attention sees its norm's output / sqrt(3)
    block, seen = model.layers["2"], {}
    block.attention.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    x = torch.randn(2, 5, 32)
    block(x)
    torch.testing.assert_close(seen["x"], block.attention_norm(x) / math.sqrt(3))


def test_fixup_init_scales():
    model = make(norm="none", init="fixup", tie_embeddings=False)
    s = tfixup_scale(3)
    assert s == pytest.approx((27) ** -0.25)
    emb = model.tok_embeddings.weight
    assert emb.std().item() == pytest.approx(32 ** -0.5 * s, rel=0.1)
    a = model.layers["0"].attention
    bound = math.sqrt(6 / (32 + 32))  # xavier_uniform bound at gain 1
    assert a.wq.weight.abs().max() <= bound and a.wq.weight.abs().max() > 0.9 * bound
    assert a.wv.weight.abs().max() <= s * bound and a.wv.weight.abs().max() > 0.9 * s * bound


def test_default_module_names_unchanged():
    """The default path keeps the Llama/torchtitan FQNs HF export and TP plans rely on."""
    keys = set(make().state_dict())
    block = {f"layers.{i}.{k}" for i in range(3) for k in (
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
        "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
        "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")}
    assert keys == block | {"tok_embeddings.weight", "norm.weight", "output.weight"}
    m = make()
    c = m.cfg
    assert m.flops_per_token(16) == (6 * (m.num_params() + c.d_model * c.vocab_size)
                                     + 12 * c.n_layers * c.d_model * 16)


# ---- embeddings and parameter sharing

@pytest.mark.parametrize("tied", [True, False])
def test_factorised_embedding_param_count(tied):
    V, d, e = 61, 32, 8
    base = make(tie_embeddings=tied)
    fact = make(tie_embeddings=tied, embedding_dim=e)
    # tied (ALBERT): V x e embedding (reused as the output), e x d in, d x e out
    # untied: V x e embedding, e x d in, a full d x V output
    expect = n_params(base) - V * d + V * e + (2 * e * d if tied else e * d)
    assert n_params(fact) == expect
    assert fact.num_params() == base.num_params()  # the factorisation counts as embedding
    assert fact(tokens(2, 5)).shape == (2, 5, V)


def test_share_layers_param_count_and_state_dict():
    base, shared = make(), make(share_layers=True)
    block = sum(p.numel() for p in base.layers["0"].parameters())
    assert n_params(shared) == n_params(base) - 2 * block  # one block instead of three
    assert not any(k.startswith(("layers.1.", "layers.2.")) for k in shared.state_dict())
    assert list(shared.layers) == ["0"] and len(shared.blocks()) == 3
    assert shared.flops_per_token(16) == base.flops_per_token(16)  # same compute per token
    # forward applies layers["0"] three times
    x = tokens(2, 6)
    with torch.no_grad():
        h = shared.tok_embeddings(x)
        rope = (shared.rope_cos[:6], shared.rope_sin[:6])
        for _ in range(3):
            h = shared.layers["0"](h, rope)
        torch.testing.assert_close(shared(x), shared.output(shared.norm(h)))


def test_shared_params_counted_once_by_the_optimizer():
    from llmtrain.train.optim import param_groups
    model = make(share_layers=True)
    n = sum(p.numel() for g in param_groups(model, 0.1) for p in g["params"])
    assert n == n_params(model)


# ---- output

def test_mos_with_one_component_is_the_softmax():
    model = make(output="mos", mos_k=1)
    x = tokens(2, 6)
    with torch.no_grad():
        out = model(x)
        head = model.output
        model.output = None  # forward returns the final hidden states
        h = model(x)
        model.output = head
        ref = F.log_softmax(model.output(torch.tanh(model.mos.latent(h))), dim=-1)
    torch.testing.assert_close(out, ref)


def test_mos_is_a_distribution_and_mixes():
    model = make(output="mos", mos_k=3)
    with torch.no_grad():
        out = model(tokens(2, 6))
        latents, log_prior = model.mos(torch.randn(4, 32))
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2, 6))
    assert latents.shape == (4, 3, 32) and log_prior.exp().sum(-1).allclose(torch.ones(4))
    # cross entropy of the log-probabilities is their negative at the label
    labels = tokens(2, 6, seed=4)
    torch.testing.assert_close(F.cross_entropy(out.flatten(0, 1), labels.flatten()),
                               -out.gather(-1, labels[..., None]).mean())


# ---- token mixers

@pytest.mark.parametrize("mixer", [*MIXERS, "linear_attention"])
def test_mixer_decoder_is_causal(mixer):
    model = make(mixer=mixer)
    with torch.no_grad():  # make gMLP's near-zero spatial weights matter
        for block in model.layers.values():
            if mixer == "gmlp":
                block.mixer.spatial_weight.normal_(0, 0.3)
    x = tokens(2, 12)
    for t in (0, 5, 11):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 61
        with torch.no_grad():
            a, b = model(x), model(y)
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
        assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-5  # later positions see it


@pytest.mark.parametrize("mixer", [*MIXERS, "linear_attention"])
def test_mixer_doc_mask_and_shorter_sequences(mixer):
    model = make(mixer=mixer)
    with torch.no_grad():
        for block in model.layers.values():
            if mixer == "gmlp":
                block.mixer.spatial_weight.normal_(0, 0.3)
    first, second = tokens(1, 5, seed=2), tokens(1, 7, seed=3)
    packed = torch.cat([first, second], dim=1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        masked = model(packed, doc_ids=doc_ids)
        torch.testing.assert_close(masked[:, :5], model(first))  # T=5 < max_seq_len slices
        assert model(packed).shape == (1, 12, 61)
    assert not torch.allclose(masked[:, 5:], model(packed)[:, 5:])


# ---- validation

@pytest.mark.parametrize("sets, message", [
    (["model.residual=rezero", "model.norm_position=post"], "model.residual=rezero needs"),
    (["model.init=fixup"], "model.init=fixup is an initialisation for models without"),
    (["model.norm=none", "model.norm_position=b2t"], "model.norm=none needs"),
    (["model.embedding_dim=128"], "model.embedding_dim=128 must be below"),
    (["model.share_layers=true", "model.moe.num_experts=4"], "model.share_layers=true cannot"),
    (["model.mixer=gmlp", "parallel.tp=2", "parallel.dp_shard=1"], "model.mixer=gmlp with "
                                                                   "parallel.tp=2"),
    (["model.output=mos", "parallel.tp=2", "parallel.dp_shard=1"], "model.output=mos with "
                                                                   "parallel.tp=2"),
    (["model.share_layers=true", "parallel.pp=2", "parallel.dp_shard=1"],
     "model.share_layers=True with parallel.pp=2"),
    (["model.arch=encoder_decoder", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
      "model.mixer=gmlp"], "model.mixer=gmlp is implemented for model.arch=decoder only"),
    (["model.activation=relu", "model.moe.num_experts=4"], "model.activation=relu is not "
                                                           "implemented for MoE"),
    (["model.activation=tanh"], "model.activation='tanh' is not valid"),
    # issue 25's variants
    (["model.value_residual=true", "parallel.pp=2", "parallel.dp_shard=1",
      "model.tie_embeddings=false"], "model.value_residual=True with parallel.pp=2"),
    (["model.value_residual=true", "model.mixer=gmlp"], "model.value_residual=true mixes"),
    (["model.qk_norm=true", "model.mixer=linear_attention"], "model.qk_norm=true normalises"),
    (["model.qk_norm=true", "model.n_kv_heads=1", "parallel.tp=2", "parallel.dp_shard=1"],
     "model.qk_norm=true with parallel.tp=2 needs the kv heads split"),
    (["model.activation=polynorm", "model.moe.num_experts=4"], "model.activation=polynorm is "
                                                               "not implemented for MoE"),
    (["model.arch=encoder_decoder", "model.n_encoder_layers=1", "model.n_decoder_layers=1",
      "model.activation=polyrelu"], "model.activation=polyrelu is implemented for model.arch="
                                    "decoder only"),
    (["model.logit_softcap=-1"], "model.logit_softcap"),
])
def test_bad_combinations_are_one_line_errors(sets, message, tmp_path):
    world = 2 if any("tp=2" in s or "pp=2" in s for s in sets) else 1
    with pytest.raises(ConfigError, match=message) as e:
        load_config(None, sets, world_size=world)
    assert "\n" not in str(e.value)


def test_cli_exit_code_2(tmp_path, capsys):
    assert cli_train(["model.init=fixup", f"logging.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.init=fixup") and "\n" not in err


# ---- every option trains through the CLI

TRAIN = {
    "relu": ["model.activation=relu"], "reglu": ["model.activation=reglu"],
    "rezero-nonorm": ["model.residual=rezero", "model.norm=none"],
    "rezero-rmsnorm": ["model.residual=rezero"],
    "fixup": ["model.norm=none", "model.init=fixup"],
    "ln_scaling": ["model.ln_scaling=inv_sqrt_depth"],
    "factorised": ["model.embedding_dim=16"], "shared": ["model.share_layers=true"],
    "mos": ["model.output=mos", "model.mos_k=2"],
    **{m: [f"model.mixer={m}"] for m in MIXERS},
}


@pytest.mark.parametrize("name", list(TRAIN))
def test_variant_trains_through_the_cli(name, tiny):
    sets = tiny(**{"train.steps": 3}) + TRAIN[name]
    assert cli_train(sets) == 0
    run = run_dir_of(sets)
    summary = read_summary(run)
    losses = read_losses(run)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(summary["final_val_loss"])


# ---- data parallelism (ZeRO) composes: 2 gloo ranks match the single-process run

@pytest.mark.parametrize("zero", [0, 3])
def test_variants_under_data_parallel_match_single_process(zero, tiny, tmp_path):
    variant = {"model.share_layers": "true", "model.residual": "rezero", "model.mixer": "gmlp",
               "model.output": "mos", "model.mos_k": 2, "model.embedding_dim": 16,
               "train.steps": 4}

    single = tmp_path / "single"
    assert cli_train(tiny(**variant, **{"logging.run_dir": single})) == 0
    multi = tmp_path / "multi"
    run_train(tiny(**variant, **{"logging.run_dir": multi, "parallel.zero_stage": zero}), nproc=2)
    assert read_losses(multi) == pytest.approx(read_losses(single), rel=1e-5)


# ---- issue 25: QK-norm, value residual, PolyNorm/PolyReLU, linear attention, logit soft-cap

def random_norm_weights(model, seed: int = 0) -> None:
    """Non-trivial norm scales (all start at one), so a norm applied to the wrong tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def test_qk_norm_matches_transformers_qwen3():
    """Qwen3 is Llama plus q_norm/k_norm (RMSNorm over head_dim per head, before rope): our
    weights copied under the export's Llama names plus those two give the same logits."""
    transformers = pytest.importorskip("transformers")
    from llmtrain.train.export import hf_llama_name
    c = cfg(n_layers=2, n_kv_heads=2, d_ff=48, max_seq_len=16, norm_eps=1e-6, qk_norm=True,
            tie_embeddings=False)
    ours = seeded_model(c)
    random_norm_weights(ours)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=False, attention_bias=False,
        hidden_act="silu", attn_implementation="eager")).eval()
    state = {}
    for name, value in ours.state_dict().items():
        if ".q_norm." in name or ".k_norm." in name:  # Qwen3's self_attn.{q,k}_norm
            name = "model." + name.replace("attention.", "self_attn.")
        else:
            name = hf_llama_name(name, c)
        state[name] = value
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    x = tokens(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)
        ours.layers["1"].attention.k_norm.weight.mul_(2)  # the norm is in the path
        assert not torch.allclose(ours(x), hf(x).logits, atol=1e-3)


def resformer_reference(model, x: torch.Tensor) -> torch.Tensor:
    """Pre-LN decoder logits written out from the equations: softmax(q k^T / sqrt(d_h) + causal)
    V'_n per head, V'_1 = V_1, V'_n = (V_n + V_1) / 2 for n > 1 (Zhou et al. 2024, lambda 1/2
    each), SwiGLU FFN."""
    from llmtrain.model.rope import apply_rope
    T = x.shape[1]
    h = model.tok_embeddings(x)
    rope = (model.rope_cos[:T], model.rope_sin[:T])
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    v1 = None
    for block in model.blocks():
        a, n = block.attention, block.attention_norm(h)
        q, k, v = (w(n).unflatten(-1, (-1, a.head_dim)) for w in (a.wq, a.wk, a.wv))
        q, k = apply_rope(q, *rope).transpose(1, 2), apply_rope(k, *rope).transpose(1, 2)
        v1 = v if v1 is None else v1
        vn = (0.5 * (v + v1)).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)).masked_fill(~causal, -math.inf)
        h = h + a.wo((scores.softmax(-1) @ vn).transpose(1, 2).flatten(2))
        f = block.feed_forward
        n = block.ffn_norm(h)
        h = h + f.w2(F.silu(f.w1(n)) * f.w3(n))
    return model.output(model.norm(h))


def test_value_residual_matches_resformer_and_checkpointing():
    model = make(value_residual=True)
    x = tokens(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x), resformer_reference(model, x))
        # the first layer is unchanged and the later ones differ from a plain Transformer
        plain = make()
        plain.load_state_dict(model.state_dict())
        h = model.tok_embeddings(x)
        rope = (model.rope_cos[:12], model.rope_sin[:12])
        torch.testing.assert_close(model.layers["0"](h, rope)[0], plain.layers["0"](h, rope))
        assert not torch.allclose(model(x), plain(x), atol=1e-4)
    # activation checkpointing (full) recomputes the blocks, V_1 included: same gradients
    from llmtrain.parallel.checkpointing import apply_ac
    model.train()
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    apply_ac(model, load_config(None, ["parallel.activation_checkpointing=full"]))
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


@pytest.mark.parametrize("kind", ["polyrelu", "polynorm"])
def test_poly_activations_match_paper(kind):
    """Zhuo et al. 2025 (section 3) at r = 3 with the authors' initial coefficients (1/3, 0)."""
    from llmtrain.model.mlp import PolyActivation
    act = PolyActivation(kind)
    assert torch.equal(act.weight, torch.full((3,), 1 / 3)) and act.bias.item() == 0.0
    with torch.no_grad():
        act.weight.copy_(torch.tensor([0.5, -0.7, 0.2]))
        act.bias.fill_(0.3)
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))
    if kind == "polyrelu":
        terms = [x.clamp(min=0) ** i for i in (1, 2, 3)]
    else:  # x^i / ||x^i||_2 * sqrt(hidden): the RMS normalisation over the hidden units
        terms = [x ** i / torch.sqrt((x ** i).pow(2).mean(-1, keepdim=True) + 1e-6)
                 for i in (1, 2, 3)]
    ref = 0.3 + 0.5 * terms[0] - 0.7 * terms[1] + 0.2 * terms[2]
    torch.testing.assert_close(act(x), ref)
    # in the MLP: w2(poly(w1 x)), a plain (non-GLU) 4 d width; the model counts it exactly
    from llmtrain.planner import memory
    ff = FeedForward(8, 16, kind)
    y = torch.randn(3, 8)
    torch.testing.assert_close(ff(y), ff.poly(y @ ff.w1.weight.T) @ ff.w2.weight.T)
    c = cfg(activation=kind, qk_norm=True)
    model = seeded_model(c)
    assert c.ffn_dim == 4 * c.d_model and model.layers["0"].feed_forward.w3 is None
    assert torch.equal(model.layers["2"].feed_forward.poly.weight,  # init_weights
                       torch.full((3,), 1 / 3))
    assert memory.param_counts(c).total == n_params(model)
    assert model.flops_per_token(16) == (6 * (model.num_params() + c.d_model * c.vocab_size)
                                         + 12 * c.n_layers * c.d_model * 16)


def test_linear_attention_matches_quadratic_form():
    """The O(T) prefix sums against Katharopoulos et al. (section 3.2) written out quadratically:
    V'_i = sum_j m_ij phi(q_i).phi(k_j) v_j / sum_j m_ij phi(q_i).phi(k_j), m the causal mask,
    or the block-diagonal causal one of packed documents."""
    from llmtrain.model.mixers import (causal_linear_attention, document_starts,
                                       elu_feature_map)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 3, 4, generator=g) for _ in range(3))
    fq, fk = elu_feature_map(q), elu_feature_map(k)
    assert (fq > 0).all()

    def quadratic(m):
        a = torch.einsum("bihm,bjhm->bhij", fq, fk) * m
        return torch.einsum("bhij,bjhd->bihd", a, v) / (a.sum(-1).transpose(1, 2)[..., None]
                                                         + 1e-6)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(causal_linear_attention(fq, fk, v), quadratic(causal))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [0] * 7 + [1] * 2 + [2]])
    mask = ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal)[:, None]
    starts = document_starts(mask)
    assert starts[1].tolist() == [0] * 7 + [7, 7, 9]
    torch.testing.assert_close(causal_linear_attention(fq, fk, v, starts), quadratic(mask))
    with pytest.raises(ValueError, match="block-diagonal"):
        document_starts(mask & ~torch.eye(10, dtype=torch.bool))  # not a document mask
    # FLOPs: 12 d head_dim per layer in place of attention's 12 d T
    model = make(mixer="linear_attention")
    c = model.cfg
    assert model.flops_per_token(16) == (6 * (model.num_params() + c.d_model * c.vocab_size)
                                         + 12 * c.n_layers * c.d_model * c.head_dim)


def test_logit_softcap_plain_chunked_and_gemma2():
    """c tanh(z / c) on the output logits (Gemma 2); the chunked and the fused loss
    (train/lean_loss.py) give the same loss and gradients as cross entropy of the capped logits; transformers' Gemma2
    final_logit_softcapping is the same formula."""
    transformers = pytest.importorskip("transformers")
    from llmtrain.train.lean_loss import chunked_loss_head
    c = 0.5  # small, so that the cap bends the logits of this tiny model
    model, plain = make(logit_softcap=c), make()
    x, labels = tokens(2, 8), tokens(2, 8, seed=3)
    mask = torch.ones(2, 8)
    mask[1, 5:] = 0
    with torch.no_grad():
        z = plain(x)
        torch.testing.assert_close(model(x), c * torch.tanh(z / c))
        assert (model(x) - z).abs().max() > 1e-3
    grads = []
    for head in (None, chunked_loss_head(labels, mask, chunk_tokens=5),
                 chunked_loss_head(labels, mask, chunk_tokens=5, fused=True)):
        model.zero_grad()
        if head is None:
            loss = (F.cross_entropy(model(x).flatten(0, 1), labels.flatten(), reduction="none")
                    * mask.flatten()).sum()
        else:
            loss = model(x, head=head)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for lean in grads[1:]:
        torch.testing.assert_close(lean[0], grads[0][0])
        for a, b in zip(lean[1], grads[0][1]):
            torch.testing.assert_close(a, b)
    hf_cfg = transformers.Gemma2Config(vocab_size=61, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=c, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        capped = hf(x).logits
        hf.config.final_logit_softcapping = None
        torch.testing.assert_close(capped, c * torch.tanh(hf(x).logits / c))



@pytest.mark.parametrize("sets", [
    ["model.qk_norm=true", "model.value_residual=true", "model.activation=polynorm",
     "model.logit_softcap=30", "train.loss=chunked", "parallel.activation_checkpointing=full"],
    ["model.mixer=linear_attention", "model.activation=polyrelu",
     "data.reset_attention_at_eod=true"],
], ids=["qk_vres_polynorm_cap_chunked_ac", "linear_attention_polyrelu_docs"])
def test_issue25_variants_train_through_the_cli(sets, tiny):
    sets = tiny(**{"train.steps": 3}) + sets
    assert cli_train(sets) == 0
    run = run_dir_of(sets)
    losses = read_losses(run)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(read_summary(run)["final_val_loss"])
