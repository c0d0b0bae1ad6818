"""Sliding-window attention (model.attention_window, attention_global_every): logits equal to
transformers' Mistral (every layer local) and Ministral (local and global layers alternating) on
the same weights for a sequence longer than the window; the masks are built once per forward per
window kind, over the whole sequence (the context-parallel contract); export refuses what HF
Mistral cannot express."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import cli, init_run, tiny_model_config, tokens
from llmtrain.model import build_model
from llmtrain.train.export import to_hf_state_dict

transformers = pytest.importorskip("transformers")

WINDOW, T = 5, 24


def ours_and_hf(hf_class: str, attn: str, **model):
    """Our model (GQA, untied output, weights moved off their init so attention reads far
    positions) and the HF model `hf_class` of the same shape holding the same weights."""
    cfg = tiny_model_config(n_kv_heads=2, tie_embeddings=False, attention_window=WINDOW, **model)
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    every = cfg.attention_global_every
    layer_types = [("full_attention" if every and (i + 1) % every == 0 else "sliding_attention")
                   for i in range(cfg.n_layers)]
    hf_cfg = getattr(transformers, f"{hf_class}Config")(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        sliding_window=WINDOW, tie_word_embeddings=False, attn_implementation=attn,
        **({"layer_types": layer_types} if hf_class == "Ministral" else {}))
    hf = getattr(transformers, f"{hf_class}ForCausalLM")(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours, "llama"), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours, hf


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_equals_hf_mistral(attn):
    ours, hf = ours_and_hf("Mistral", attn)
    x = tokens(2, T)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)
        full = build_model(tiny_model_config(n_kv_heads=2, tie_embeddings=False)).eval()
        full.load_state_dict(ours.state_dict())
        assert (ours(x) - full(x)).abs().max() > 1e-2  # the window did change the model


def test_global_layers_equal_hf_ministral():
    """attention_global_every=2 on 4 layers: layers 1 and 3 attend fully (Gemma 2's
    alternation), as Ministral's layer_types [sliding, full, sliding, full]."""
    ours, hf = ours_and_hf("Ministral", "eager", n_layers=4, attention_global_every=2)
    assert [b.attention_window for b in ours.blocks()] == [WINDOW, 0, WINDOW, 0]
    x = tokens(2, T)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)


class RecordMask(nn.Module):
    """Stands in for Attention.core: records the mask it is given."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, q, k, v, mask=None):
        self.seen.append(mask)
        return torch.zeros_like(q)


def test_masks_over_whole_sequence_once_per_kind():
    """tokens hold the first half of the sequence (as a context-parallel rank's), doc_ids all of
    it: each layer's mask is [B, 1, S, S] over the whole sequence, the local layers' the band
    t-w+1..t within documents, the global layers' the document-causal mask; one tensor per kind."""
    model = build_model(tiny_model_config(n_layers=4, attention_window=WINDOW,
                                          attention_global_every=2)).eval()
    seen = []
    for block in model.blocks():
        block.attention.core = RecordMask(seen)
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    with torch.no_grad():
        model(tokens(2, T // 2), doc_ids=doc_ids, positions=torch.arange(T // 2))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    local = (same_doc & (k <= q) & (k > q - WINDOW))[:, None]
    full = (same_doc & (k <= q))[:, None]
    assert [m.shape for m in seen] == [(2, 1, T, T)] * 4
    assert torch.equal(seen[0], local) and torch.equal(seen[1], full)
    assert seen[0] is seen[2] and seen[1] is seen[3]


def test_window_without_doc_ids_and_refused_exports(tmp_path, capsys):
    """Without doc_ids the local mask is the band over T; a window at least T long is the plain
    causal path (no mask). Export refuses alternating global layers, in one line."""
    model = build_model(tiny_model_config(attention_window=WINDOW)).eval()
    seen = []
    for block in model.blocks():
        block.attention.core = RecordMask(seen)
    with torch.no_grad():
        model(tokens(1, T))
        model(tokens(1, WINDOW))
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    assert torch.equal(seen[0], ((k <= q) & (k > q - WINDOW))[None, None])
    assert seen[2] is None
    run = tmp_path / "run"
    init_run(run, **{"model.attention_window": 8, "model.attention_global_every": 2})
    capsys.readouterr()
    assert cli("export", str(run), "--out", str(tmp_path / "hf")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.attention_global_every=2 cannot be exported" in err
    assert not (tmp_path / "hf").exists()
