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

@pytest.mark.parametrize("mixer", MIXERS)
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


@pytest.mark.parametrize("mixer", MIXERS)
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
