"""`llmtrain bench` on the CPU: runs the real step for ours and the same-shape HF model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from helpers import set_args
from llmtrain.bench import hf_ce_sum, hf_llama
from llmtrain.cli import main
from llmtrain.config import load_config
from llmtrain.data.loader import Batch
from llmtrain.train.loss import cross_entropy_sum


def test_bench_cli_writes_every_figure(tmp_path):
    """Ours and HF, eager and compiled (torch.compile builds C++ here: the smallest shape)."""
    out = tmp_path / "bench.json"
    code = main(["bench", *set_args(["model.n_layers=2", "model.d_model=32", "train.seq_len=16",
                                     "model.vocab_size=256"]),
                 "--steps", "2", "--warmup", "0", "--batch", "2", "--compare", "hf",
                 "--json", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["results"]
    assert list(rows) == ["llmtrain eager", "llmtrain compiled", "hf eager", "hf compiled"]
    for name, r in rows.items():
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["tokens_per_s"] == 2 * 16 / r["step_s_median"]
        # the compile time is the first step's excess over the steady state, compiled rows only
        assert ("compile_s" in r) == name.endswith("compiled")
    for name in ("llmtrain compiled", "hf compiled"):
        assert rows[name]["compile_s"] == rows[name]["first_step_s"] - rows[name]["step_s_median"]
        assert rows[name]["graphs"] >= 1  # the compiled rows did compile
    for mode in ("eager", "compiled"):
        assert rows[f"hf {mode}"]["ours_over_this"] == pytest.approx(
            rows[f"llmtrain {mode}"]["tokens_per_s"] / rows[f"hf {mode}"]["tokens_per_s"])


def test_hf_twin_has_our_parameter_count():
    cfg = load_config(None, ["model.n_layers=2", "model.d_model=64", "model.n_kv_heads=2",
                             "model.tie_embeddings=false"])
    from llmtrain.model import build_model
    ours = build_model(cfg.model).num_params(non_embedding=False)
    assert sum(p.numel() for p in hf_llama(cfg).parameters()) == ours


def test_hf_rows_loss_is_the_cross_entropy_sum_of_its_logits():
    """HF's rows train on the loss HF's forward computes: on our (already shifted) labels, summed
    over the unmasked tokens, as our plain loss computes it from HF's logits."""
    cfg = load_config(None, ["model.n_layers=1", "model.d_model=32", "model.vocab_size=97"])
    torch.manual_seed(0)
    hf = hf_llama(cfg)
    tokens = torch.randint(0, 97, (2, 13))
    mask = torch.ones(2, 12)
    mask[1, 7:] = 0
    batch = Batch(tokens[:, :-1], tokens[:, 1:], mask, None, [])
    got = hf_ce_sum(hf, torch.device("cpu"))(batch)
    with torch.no_grad():
        expected = cross_entropy_sum(hf(batch.tokens).logits, batch.labels, mask)
    torch.testing.assert_close(got.detach(), expected)


def test_bench_refuses_non_llama_layout_for_hf(capsys):
    assert main(["bench", "--set", "model.activation=gelu", "--compare", "hf", "--steps", "1"]) == 2
    assert "needs the Llama layout" in capsys.readouterr().err


@pytest.mark.parametrize("installed", [None, "4.49.0"])
def test_bench_without_a_recent_transformers_is_one_line_before_any_timing(
        capsys, monkeypatch, installed):
    import types
    fake = None if installed is None else types.SimpleNamespace(__version__=installed)
    monkeypatch.setitem(sys.modules, "transformers", fake)  # None: `import` raises ImportError
    assert main(["bench", "--compare", "hf", "--steps", "1", "--no-compile"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("error: --compare hf needs transformers"
                                                   if installed else
                                                   "error: --compare hf needs the transformers")
    assert "pip install 'transformers>=4.50'" in err
    assert out == ""  # refused before our own rows were timed
