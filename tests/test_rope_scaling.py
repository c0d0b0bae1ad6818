"""model.rope_scaling (model/rope.py) against transformers: each type's rope frequencies equal
ROPE_INIT_FUNCTIONS', the model's logits equal LlamaForCausalLM's on the same weights beyond the
pretraining length, and export-hf / import-hf carry the setting (with a sliding window: Mistral)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from helpers import cli, init_run, tiny_model_config, tokens
from llmtrain.config import ConfigError, RopeScalingConfig, load_config
from llmtrain.model import build_model
from llmtrain.model.rope import rope_inv_freq
from llmtrain.train.export import load_checkpoint_model, to_hf_state_dict

transformers = pytest.importorskip("transformers")

# HF rope_parameters beyond rope_type and rope_theta, at published sizes (head dim 128): Llama 3.1
# (factor 8 over 8192), YaRN at its defaults and with every knob set.
TABLES = {
    "linear": ("linear", {"factor": 4.0}),
    "dynamic": ("dynamic", {"factor": 4.0}),
    "yarn": ("yarn", {"factor": 4.0, "original_max_position_embeddings": 4096}),
    "yarn_knobs": ("yarn", {"factor": 8.0, "original_max_position_embeddings": 2048,
                            "beta_fast": 16.0, "beta_slow": 2.0, "attention_factor": 1.3}),
    "llama3": ("llama3", {"factor": 8.0, "original_max_position_embeddings": 8192,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
}
ORIGINAL = 4096  # dynamic's pretraining length (HF: max_position_embeddings)


@pytest.mark.parametrize("case", list(TABLES))
def test_frequencies_equal_transformers(case):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind, params = TABLES[case]
    head_dim, theta = 128, 500000.0
    hf_cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                      max_position_embeddings=ORIGINAL,
                                      rope_parameters={"rope_type": kind, "rope_theta": theta,
                                                       **params})
    ours = RopeScalingConfig(type=kind, **params)
    if kind == "dynamic":
        ours.original_max_position_embeddings = ORIGINAL
    plain, _ = rope_inv_freq(head_dim, theta)
    for seq_len in (ORIGINAL // 2, ORIGINAL, 3 * ORIGINAL):  # within and beyond the pretraining
        want, want_factor = ROPE_INIT_FUNCTIONS[kind](hf_cfg, None, seq_len=seq_len)
        got, factor = rope_inv_freq(head_dim, theta, ours, seq_len)
        torch.testing.assert_close(got, want)
        assert factor == pytest.approx(want_factor, rel=1e-12)
        # dynamic NTK leaves rope alone up to the pretraining length; the others scale always
        assert torch.equal(got, plain) == (kind == "dynamic" and seq_len <= ORIGINAL)


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn", "llama3"])
def test_logits_equal_hf_llama_beyond_original_length(kind):
    """A 24-token sequence, 3x the pretraining length 8 (head dim 8: the YaRN ramp and all three
    Llama 3 bands are populated). Dynamic also at 8 tokens, where it is plain rope, first (HF
    caches its longest table)."""
    original = 8
    scaling = {"type": kind, "factor": 3.0, "original_max_position_embeddings": original}
    cfg = tiny_model_config(n_kv_heads=2, max_seq_len=24, rope_scaling=RopeScalingConfig(**scaling))
    torch.manual_seed(0)
    ours = build_model(cfg).eval()
    with torch.no_grad():  # weights far enough from their init that attention reads positions
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    params = {"rope_type": kind, "rope_theta": cfg.rope_theta, "factor": 3.0}
    if kind in ("yarn", "llama3"):
        params["original_max_position_embeddings"] = original
    if kind == "llama3":
        params.update(low_freq_factor=1.0, high_freq_factor=4.0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps,
        max_position_embeddings=original if kind == "dynamic" else cfg.max_seq_len,
        rope_parameters=params, tie_word_embeddings=True, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours, "llama"), strict=False)
    assert not unexpected and all("rotary" in k or k == "lm_head.weight" for k in missing)
    plain = build_model(tiny_model_config(n_kv_heads=2, max_seq_len=24)).eval()
    plain.load_state_dict(ours.state_dict())
    x = tokens(2, 24, vocab=cfg.vocab_size)
    with torch.no_grad():
        if kind == "dynamic":
            torch.testing.assert_close(ours(x[:, :original]), hf(x[:, :original]).logits,
                                       rtol=0, atol=1e-5)
            torch.testing.assert_close(ours(x[:, :original]), plain(x[:, :original]),
                                       rtol=0, atol=0)
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=1e-5)
        diff = (ours(x) - plain(x)).abs().max()
        assert diff > 1e-2, diff  # the scaling did change the model


@pytest.mark.parametrize("case", [
    # yarn with a sliding window: exported as Mistral
    {"model.rope_scaling.type": "yarn", "model.attention_window": 12},
    # dynamic: HF reads its pretraining length from max_position_embeddings (16); import sets
    # max_seq_len = 16 x factor, the run's 64
    {"model.rope_scaling.type": "dynamic"},
])
def test_hf_round_trip(case, tmp_path):
    """export-hf writes the setting into config.json, transformers runs the exported model as
    ours beyond the pretraining length, import-hf reads back the same model config and weights."""
    run, hf_dir, imported = tmp_path / "run", tmp_path / "hf", tmp_path / "imported"
    cfg, ours = init_run(run, **case, **{"model.rope_scaling.factor": 4.0,
                                         "model.rope_scaling.original_max_position_embeddings": 16,
                                         "model.n_kv_heads": 2})
    assert cli("export", str(run), "--out", str(hf_dir)) == 0
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    window = cfg.model.attention_window
    assert hf_cfg["model_type"] == ("mistral" if window else "llama")
    assert hf_cfg.get("sliding_window") == (window or None)
    assert hf_cfg["rope_parameters"]["rope_type"] == cfg.model.rope_scaling.type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    x = tokens(2, 64, vocab=cfg.model.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x).logits, ours(x), rtol=0, atol=1e-4)

    assert cli("import-hf", str(hf_dir), "--out", str(imported)) == 0
    new_cfg = load_config(imported / "config.yaml")
    assert new_cfg.model == dataclasses.replace(cfg.model, d_ff=cfg.model.ffn_dim)
    back = load_checkpoint_model(imported / "checkpoints" / "step_0", new_cfg).state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(back[k], v), k


@pytest.mark.parametrize("overrides, expected", [
    ({"model.rope_scaling.type": "yarn"},
     "model.rope_scaling.type=yarn needs model.rope_scaling.original_max_position_embeddings"),
    ({"model.rope_scaling.type": "linear", "model.position": "learned"},
     "model.rope_scaling.type=linear needs model.position=rope, got learned"),
    ({"model.rope_scaling.factor": 0.5}, "model.rope_scaling.factor=0.5 is out of range"),
    ({"model.rope_scaling.type": "llama3", "model.rope_scaling.original_max_position_embeddings":
      64, "model.rope_scaling.high_freq_factor": 1.0},
     "model.rope_scaling.high_freq_factor=1.0 must exceed low_freq_factor=1.0"),
    ({"model.attention_global_every": 2}, "model.attention_global_every=2 needs "
                                          "model.attention_window > 0"),
    ({"model.attention_window": 8, "model.mixer": "gmlp"},
     "model.attention_window=8 is implemented for model.arch=decoder with mixer=attention"),
    ({"model.attention_window": 8, "model.attention_global_every": 2,
      "model.share_layers": True}, "model.share_layers=true is not supported"),
])
def test_config_errors_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
