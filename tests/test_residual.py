"""Residual placements (model/residual.py): each against its formula written out by hand on a tiny
sublayer, and the decoder-only and encoder-decoder blocks going through them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmtrain.config import ModelConfig
from llmtrain.model import residual
from llmtrain.model.build import build_model

D = 8


def sublayers(n: int) -> list[tuple[nn.Module, nn.Module]]:
    """n (LayerNorm, Linear) pairs with random norm weights, so that LN is not a plain
    standardisation and no two sublayers are alike."""
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        norm, f = nn.LayerNorm(D), nn.Linear(D, D)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
        out.append((norm, f))
    return out


@torch.no_grad()
def test_each_placement_is_its_formula():
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1))
    (ln, f), = sublayers(1)
    alpha = 2.5
    torch.testing.assert_close(residual.pre_ln(x, ln, f), x + f(ln(x)), rtol=0, atol=0)
    torch.testing.assert_close(residual.post_ln(x, ln, f), ln(x + f(x)), rtol=0, atol=0)
    torch.testing.assert_close(residual.deepnorm(x, ln, f, alpha), ln(alpha * x + f(x)),
                               rtol=0, atol=0)
    # the placements differ on this input, so none of the checks above passes for another
    assert not torch.allclose(residual.post_ln(x, ln, f), residual.deepnorm(x, ln, f, alpha))
    assert not torch.allclose(residual.pre_ln(x, ln, f), residual.post_ln(x, ln, f))


@torch.no_grad()
@pytest.mark.parametrize("position", ["pre", "post", "deepnorm", "b2t"])
def test_residual_layer_applies_each_sublayer_in_order(position):
    """Three sublayers (an encoder-decoder's decoder layer), each placed by the formula."""
    x = torch.randn(2, 4, D, generator=torch.Generator().manual_seed(1))
    subs = sublayers(3)
    alpha = 1.7
    if position == "b2t":  # the layer input skips every LN but the last (Takase et al. eq. 4)
        (ln1, f1), (ln2, f2), (ln3, f3) = subs
        h1 = ln1(x + f1(x))
        h2 = ln2(h1 + f2(h1))
        want = ln3(h2 + f3(h2) + x)
        torch.testing.assert_close(residual.b2t(x, subs), want, rtol=0, atol=0)
    else:
        want = x
        for norm, f in subs:
            if position == "pre":
                want = want + f(norm(want))
            elif position == "post":
                want = norm(want + f(want))
            else:
                want = norm(alpha * want + f(want))
    torch.testing.assert_close(residual.residual_layer(position, x, subs, alpha), want,
                               rtol=0, atol=0)


def test_residual_layer_refuses_an_unknown_placement():
    with pytest.raises(ValueError, match="model.norm_position='sandwich' is not valid"):
        residual.residual_layer("sandwich", torch.zeros(1, D), sublayers(1))


def _record(monkeypatch) -> list[tuple[str, float | None]]:
    """Wrap residual.py's placements to record (name, DeepNorm's alpha) of each outermost call
    (post_ln calling deepnorm is one post_ln call)."""
    calls, depth = [], [0]
    for name in ("pre_ln", "post_ln", "deepnorm", "b2t"):
        fn = getattr(residual, name)

        def wrapped(*args, _fn=fn, _name=name):
            if not depth[0]:
                calls.append((_name, args[3] if _name == "deepnorm" else None))
            depth[0] += 1
            try:
                return _fn(*args)
            finally:
                depth[0] -= 1
        monkeypatch.setattr(residual, name, wrapped)
    return calls


@pytest.mark.parametrize("position", ["pre", "post", "deepnorm", "b2t"])
def test_decoder_blocks_use_residual_py(monkeypatch, position):
    N = 3
    model = build_model(ModelConfig(n_layers=N, d_model=16, n_heads=2, vocab_size=11,
                                    max_seq_len=8, norm_position=position, norm="layernorm"))
    calls = _record(monkeypatch)
    model(torch.randint(0, 11, (2, 6)))
    per_layer = {"pre": [("pre_ln", None)] * 2,
                 "post": [("post_ln", None)] * 2,
                 "deepnorm": [("deepnorm", residual.deepnorm_alpha(N))] * 2,
                 "b2t": [("b2t", None)]}[position]
    assert calls == per_layer * N


@pytest.mark.parametrize("position", ["pre", "post", "deepnorm", "b2t"])
def test_encoder_decoder_blocks_use_residual_py(monkeypatch, position):
    N, M = 2, 3
    model = build_model(ModelConfig(arch="encoder_decoder", n_encoder_layers=N,
                                    n_decoder_layers=M, d_model=16, n_heads=2, vocab_size=11,
                                    max_seq_len=8, norm_position=position, norm="layernorm"))
    calls = _record(monkeypatch)
    model(torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 4)))
    enc_alpha, dec_alpha = ((residual.deepnorm_encoder_alpha(N, M),
                             residual.deepnorm_decoder_alpha(M))
                            if position == "deepnorm" else (1.0, 1.0))

    def layer(n_sublayers, alpha):
        return {"pre": [("pre_ln", None)] * n_sublayers,
                "post": [("post_ln", None)] * n_sublayers,
                "deepnorm": [("deepnorm", alpha)] * n_sublayers,
                "b2t": [("b2t", None)]}[position]
    # encoder layers: self-attention, FFN; decoder layers: self-attention, cross-attention, FFN
    assert calls == layer(2, enc_alpha) * N + layer(3, dec_alpha) * M
