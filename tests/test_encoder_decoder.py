"""Encoder-decoder model, its position schemes and greedy generation: each test compares against a
reference (a formula, a hand-computed T5 bucket, a masked input, a task with a known answer)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import one_thread, seeded_model, tokens
from llmtrain.config import ConfigError, ModelConfig, MoEConfig, load_config
from llmtrain.generate import greedy_decoder, greedy_encoder_decoder
from llmtrain.model.build import build_encoder_decoder, build_model
from llmtrain.model.encoder_decoder import (deepnorm_decoder_alpha, deepnorm_decoder_beta,
                                            deepnorm_encoder_alpha, deepnorm_encoder_beta)
from llmtrain.model.positions import (RelativePositionBias, relative_position_bucket,
                                      sinusoidal_table)

NORM_POSITIONS = ["pre", "post", "deepnorm", "b2t"]
POSITIONS = ["rope", "learned", "sinusoidal", "t5_relative", "none"]
V = 37


def cfg(**kw) -> ModelConfig:
    base = dict(arch="encoder_decoder", n_encoder_layers=2, n_decoder_layers=2, d_model=32,
                n_heads=4, vocab_size=V, max_seq_len=16)
    return ModelConfig(**{**base, **kw})


def make(seed: int = 0, **kw):
    return seeded_model(cfg(**kw), seed)


# ----------------------------------------------------------------------------------------------
# Masks: causal decoder, bidirectional encoder, source padding


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_causal_encoder_bidirectional(norm_position, position):
    # init_std 0.1: with 0.02 a token's effect on later positions is near float noise
    model = make(norm_position=norm_position, position=position, init_std=0.1)
    src, tgt = tokens(2, 10, V, 1), tokens(2, 8, V, 2)
    t = 4
    tgt2 = tgt.clone()
    tgt2[:, t] = (tgt2[:, t] + 1) % V
    with torch.no_grad():
        a, b = model(src, tgt), model(src, tgt2)
    assert a.shape == (2, 8, V)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 1e-4

    s = 6
    src2 = src.clone()
    src2[:, s] = (src2[:, s] + 1) % V
    with torch.no_grad():
        ea, eb = model.encode(src), model.encode(src2)
        changed = (ea - eb).abs().amax(-1)  # [B, S]
        assert changed.min() > 1e-4  # every source position sees token s, earlier ones too
        assert (model(src, tgt) - model(src2, tgt)).abs().amax(-1).min() > 1e-4


@pytest.mark.parametrize("position", ["rope", "t5_relative"])
@pytest.mark.parametrize("norm_position", ["pre", "deepnorm"])
def test_source_padding_is_masked(norm_position, position):
    model = make(norm_position=norm_position, position=position)
    src, tgt = tokens(3, 10, V, 3), tokens(3, 7, V, 4)
    real = torch.ones(3, 10, dtype=torch.bool)
    real[0, 6:] = False
    real[2, 3:] = False
    src2 = torch.where(real, src, (src + 5) % V)  # only padded positions differ
    with torch.no_grad():
        torch.testing.assert_close(model(src, tgt, real), model(src2, tgt, real), rtol=0,
                                   atol=1e-6)
        e1, e2 = model.encode(src, real), model.encode(src2, real)
        torch.testing.assert_close(e1[real], e2[real], rtol=0, atol=1e-6)
        # and the mask is what makes the difference: unmasked, the padding is read
        assert (model(src, tgt) - model(src2, tgt))[0].abs().max() > 1e-4
        # a batch row with no padding equals the same row run alone without a mask
        torch.testing.assert_close(model(src, tgt, real)[1], model(src[1:2], tgt[1:2])[0],
                                   rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Constants and position encodings against their formulas


def test_deepnorm_encoder_decoder_constants():
    for n, m in ((1, 1), (6, 6), (12, 6), (100, 200)):
        assert deepnorm_encoder_alpha(n, m) == pytest.approx(0.81 * (n ** 4 * m) ** (1 / 16))
        assert deepnorm_encoder_beta(n, m) == pytest.approx(0.87 * (n ** 4 * m) ** (-1 / 16))
        assert deepnorm_decoder_alpha(m) == pytest.approx((3 * m) ** 0.25)
        assert deepnorm_decoder_beta(m) == pytest.approx((12 * m) ** -0.25)
    assert deepnorm_encoder_alpha(2, 16) == pytest.approx(0.81 * 2 ** 0.5)  # (2^4 * 2^4)^(1/16)
    assert deepnorm_decoder_beta(27) == pytest.approx(1 / 18 ** 0.5)  # (12*27)^(-1/4) = 324^-1/4
    model = make(norm_position="deepnorm", n_encoder_layers=3, n_decoder_layers=5)
    assert model.encoder.layers["2"].alpha == pytest.approx(0.81 * (3 ** 4 * 5) ** (1 / 16))
    assert model.decoder.layers["0"].alpha == pytest.approx(15 ** 0.25)
    assert model.decoder.layers["0"].beta == pytest.approx(60 ** -0.25)
    assert make(norm_position="post").encoder.layers["0"].alpha == 1.0


def test_t5_relative_position_buckets():
    # Hand-computed from T5's `_relative_position_bucket` (32 buckets, max distance 128).
    # Bidirectional: 16 buckets a side, exact below 8, then 8 + floor(log(d/8)/log(16) * 8).
    rel = torch.tensor([0, -1, -3, -7, -20, -50, -100, -200, 1, 3, 20, 100, 1000])
    want = [0, 1, 3, 7, 10, 13, 15, 15, 17, 19, 26, 31, 31]
    assert relative_position_bucket(rel, bidirectional=True).tolist() == want
    # Unidirectional: the future is bucket 0; exact below 16, then 16 + floor(log(d/16)/log(8)*16)
    rel = torch.tensor([5, 1, 0, -1, -15, -20, -100, -200])
    want = [0, 0, 0, 1, 15, 17, 30, 31]
    assert relative_position_bucket(rel, bidirectional=False).tolist() == want

    bias = RelativePositionBias(n_heads=3, bidirectional=False)
    torch.nn.init.normal_(bias.relative_attention_bias.weight)
    b = bias(4, 6)
    assert b.shape == (1, 3, 4, 6)
    table = bias.relative_attention_bias.weight
    for i in range(4):
        for j in range(6):
            bucket = relative_position_bucket(torch.tensor(j - i), bidirectional=False)
            torch.testing.assert_close(b[0, :, i, j], table[bucket])


def test_t5_relative_bias_one_table_per_stack():
    model = make(position="t5_relative")
    names = [n for n, _ in model.named_parameters() if "relative" in n]
    assert names == ["encoder.relative_bias.relative_attention_bias.weight",
                     "decoder.relative_bias.relative_attention_bias.weight"]
    assert model.encoder.relative_bias.bidirectional
    assert not model.decoder.relative_bias.bidirectional


def test_sinusoidal_encoding():
    T, d = 12, 10
    table = sinusoidal_table(T, d)
    for pos in range(T):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    # the model adds it to the embeddings scaled by sqrt(d_model) (Vaswani et al. 3.4)
    model = make(position="sinusoidal")
    x = tokens(1, 5, V, 5)
    want = model.tok_embeddings(x) * math.sqrt(32) + sinusoidal_table(5, 32)
    torch.testing.assert_close(model._embed(model.encoder, x), want)


# ----------------------------------------------------------------------------------------------
# Every variant trains; structure and counts


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("norm_position", NORM_POSITIONS)
def test_variants_forward_backward(norm_position, position):
    model = make(norm_position=norm_position, position=position, norm="layernorm", bias=True,
                 activation="geglu", n_kv_heads=2, tie_embeddings=position != "none",
                 dropout=0.1).train()
    src, tgt = tokens(2, 9, V, 6), tokens(2, 7, V, 7)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, 5:] = False
    logits = model(src, tgt, real)
    loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten())
    loss.backward()
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_module_names_tied_and_untied():
    tied = make()
    names = {n for n, _ in tied.named_parameters()}
    assert "tok_embeddings.weight" in names and "encoder.tok_embeddings.weight" not in names
    assert tied.output.weight is tied.tok_embeddings.weight
    for n in ("decoder.layers.1.cross_attention.wq.weight", "decoder.layers.0.cross_attention_norm"
              ".weight", "encoder.layers.1.feed_forward.w1.weight", "encoder.norm.weight",
              "decoder.norm.weight", "decoder.layers.0.ffn_norm.weight"):
        assert n in names, n
    assert not any(n.startswith("encoder.layers.0.cross") for n in names)
    untied = make(tie_embeddings=False, norm_position="post")
    names = {n for n, _ in untied.named_parameters()}
    assert {"encoder.tok_embeddings.weight", "decoder.tok_embeddings.weight",
            "output.weight"} <= names
    assert "encoder.norm.weight" not in names  # only pre-LN ends in a final norm


def test_num_params_and_flops():
    model = make(position="learned", tie_embeddings=False)
    d, f, L = 32, model.cfg.ffn_dim, 2
    attn, ffn, norm = 4 * d * d, 3 * d * f, d  # swiglu: w1, w2, w3; rmsnorm: weight only
    enc = L * (attn + ffn + 2 * norm) + norm
    dec = L * (2 * attn + ffn + 3 * norm) + norm
    assert model.num_params() == enc + dec
    assert model.num_params(non_embedding=False) == enc + dec + 3 * V * d + 2 * 16 * d
    T = 8
    want = 6 * (enc + dec + d * V) + 12 * d * (L * T + L * 2 * T)
    assert model.flops_per_token(T) == want
    # a longer source costs more per target token
    assert model.flops_per_token(T, src_len=2 * T) > want


def test_switch_moe_layers():
    model = make(moe=MoEConfig(num_experts=4, every_n_layers=2))
    src, tgt = tokens(2, 9, V, 8), tokens(2, 7, V, 9)
    model.train()
    logits = model(src, tgt)
    assert sorted(model.moe_stats()) == ["decoder.layers.1.feed_forward",
                                         "encoder.layers.1.feed_forward"]
    (logits.sum() + model.aux_losses()).backward()
    assert model.num_active_params() < model.num_params()


# ----------------------------------------------------------------------------------------------
# Learning: a reversal task and a fixed pattern, solved and then generated greedily


def test_learns_to_reverse_and_generates():
    torch.manual_seed(0)
    model = build_encoder_decoder(cfg(d_model=64, vocab_size=16, max_seq_len=8,
                                      position="learned", activation="gelu"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    bos = 0  # tokens 2..15 are content

    def batch(n):
        src = torch.randint(2, 16, (n, 6), generator=gen)
        tgt = src.flip(1)
        return src, tgt, torch.cat([torch.full((n, 1), bos), tgt[:, :-1]], dim=1)

    with one_thread():
        for _ in range(800):
            src, tgt, inp = batch(32)
            loss = F.cross_entropy(model(src, inp).flatten(0, 1), tgt.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
    model.eval()
    src, tgt, inp = batch(256)
    with torch.no_grad():
        held_out = F.cross_entropy(model(src, inp).flatten(0, 1), tgt.flatten()).item()
    assert held_out < 0.05
    for i in range(5):
        assert greedy_encoder_decoder(model, src[i], 6, bos=bos) == tgt[i].tolist()
    assert model.training is False
    # eos stops generation and is not returned
    out = greedy_encoder_decoder(model, src[0], 6, bos=bos, eos=int(tgt[0, 3]))
    assert out == tgt[0, :tgt[0].tolist().index(int(tgt[0, 3]))].tolist()


def test_decoder_only_greedy_continues_pattern():
    torch.manual_seed(0)
    pattern = [3, 7, 1, 12, 5, 9, 14, 2]
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=16,
                                    max_seq_len=16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    seq = torch.tensor(pattern * 4)
    windows = torch.stack([seq[i:i + 13] for i in range(len(pattern))])
    with one_thread():
        for _ in range(200):
            loss = F.cross_entropy(model(windows[:, :-1]).flatten(0, 1), windows[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 0.01:
                break
    assert loss.item() < 0.05
    out = greedy_decoder(model, [12, 5, 9], 20)  # longer than max_seq_len: the context slides
    assert out == (pattern * 4)[6:26]
    assert greedy_decoder(model, torch.tensor([3]), 10, eos=9) == [7, 1, 12, 5]


# ----------------------------------------------------------------------------------------------
# `llmtrain generate` and the configs


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_generate_cli_loads_checkpoint(arch, tmp_path, capsys):
    from llmtrain import cli
    from llmtrain.config import Config, save_config
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.model import build_model
    from llmtrain.train.checkpoint import save_model

    tok = Tokenizer.train_bpe(iter(["hello world, hello there"] * 20), 300)
    model_cfg = (cfg(vocab_size=320, max_seq_len=32) if arch == "encoder_decoder" else
                 ModelConfig(n_layers=1, d_model=32, n_heads=4, vocab_size=320, max_seq_len=32))
    config = Config(model=model_cfg)
    config.parallel.dp_shard = 4  # the training job's layout: not validated against 1 process
    run = tmp_path / "run"
    run.mkdir()
    save_config(config, run / "config.yaml")
    tok.save(run / "tokenizer.json")  # the run's tokenizer, as the trainer leaves it
    torch.manual_seed(1)
    model = build_model(config.model, "cpu").eval()
    ckpt = save_model(run / "checkpoints", 5, model, config)
    ids = tok.encode("hello")
    if arch == "encoder_decoder":
        want = greedy_encoder_decoder(model, ids + [tok.eos], 4, tok.pad, tok.eos)
    else:
        want = greedy_decoder(model, ids, 4, tok.eos)
    torch.manual_seed(2)  # the CLI's freshly initialised model differs until loaded
    assert cli.main(["generate", str(ckpt), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == tok.decode(want) + "\n"

    # a run directory means its newest good checkpoint
    assert cli.main(["generate", str(run), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == tok.decode(want) + "\n"
    assert cli.main(["generate", str(run / "checkpoints"), "--prompt", "x"]) == 2
    assert "neither a checkpoint nor a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("name,n_enc,position", [("transformer-base-postln", 6, "sinusoidal"),
                                                 ("t5-tiny", 2, "t5_relative"),
                                                 ("t5-base", 12, "t5_relative"),
                                                 ("switch-t5-tiny", 2, "t5_relative")])
def test_configs_load_and_build(name, n_enc, position):
    from pathlib import Path
    c = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert c.model.arch == "encoder_decoder" and c.model.n_encoder_layers == n_enc
    assert c.model.position == position
    with torch.device("meta"):
        from llmtrain.model.encoder_decoder import EncoderDecoder
        model = EncoderDecoder(c.model)
    assert len(model.decoder.layers) == c.model.n_decoder_layers


@pytest.mark.parametrize("override,message", [
    ("model.n_decoder_layers=0", "model.arch=encoder_decoder needs model.n_decoder_layers >= 1"),
    ("parallel.pp=2", "parallel.pp=2 with model.arch=encoder_decoder is not supported; use pp=1"),
])
def test_config_errors(override, message):
    base = ["model.arch=encoder_decoder", "model.n_encoder_layers=2", "model.n_decoder_layers=2"]
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [*base, override], world_size=2)
    with pytest.raises(ConfigError, match="model.position=t5_relative is implemented for "
                                          "model.arch=encoder_decoder only"):
        load_config(None, ["model.position=t5_relative"])
