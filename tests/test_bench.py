"""`llmtrain bench` on the CPU: runs the real step for ours and the same-shape HF model."""

from __future__ import annotations

import json

from helpers import set_args
from llmtrain.bench import hf_llama
from llmtrain.cli import main
from llmtrain.config import load_config


def test_bench_cli_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", *set_args(["model.n_layers=2", "model.d_model=64", "train.seq_len=32"]),
                 "--steps", "2", "--warmup", "1", "--batch", "2", "--compare", "hf",
                 "--no-compile", "--json", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    for name in ("llmtrain", "hf eager"):
        r = data["results"][name]
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["tokens_per_s"] == 2 * 32 / r["step_s_median"]
    assert data["results"]["hf eager"]["ours_over_this"] > 0


def test_hf_twin_has_our_parameter_count():
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=64", "model.n_kv_heads=2",
                             "model.tie_embeddings=false"])
    from llmtrain.model import build_model
    ours = build_model(cfg.model).num_params(non_embedding=False)
    assert sum(p.numel() for p in hf_llama(cfg).parameters()) == ours


def test_bench_refuses_non_llama_layout_for_hf(capsys):
    assert main(["bench", "--set", "model.activation=gelu", "--compare", "hf", "--steps", "1"]) == 2
    assert "needs the Llama layout" in capsys.readouterr().err
