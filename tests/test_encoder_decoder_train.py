"""Encoder-decoder models through the trainer: span-corruption batches, data parallel with
ZeRO 3 against the single-process run, and generation from the trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_overrides
from test_parallel import ATOL, final_weights, read_losses, torchrun
from llmtrain.cli import main
from llmtrain.config import load_config
from llmtrain.data.loader import SpanCorruptionReader, build_datasets
from llmtrain.data.preprocess import prepare_corpus
from llmtrain.data.span_corruption import reconstruct

T5 = {"model.arch": "encoder_decoder", "model.n_encoder_layers": 2, "model.n_decoder_layers": 2,
      "model.position": "t5_relative", "model.activation": "geglu", "train.steps": 5}


def run_overrides(run: Path, **extra) -> list[str]:
    return tiny_overrides(run, **{**T5, **extra})


def test_span_corruption_batches_reconstruct_the_samples(tmp_path):
    cfg = load_config(None, run_overrides(tmp_path / "r"))
    prefix, tok = prepare_corpus(cfg, log=lambda *a: None)
    train, _ = build_datasets(cfg, prefix, tok)
    reader = SpanCorruptionReader(train, cfg, tok)
    batch = reader.get(0, 0)
    assert batch.src is not None and batch.tokens.shape == batch.labels.shape
    assert (batch.tokens[:, 0] == reader.start).all(), "decoder input starts with the start token"
    for row, i in enumerate(batch.sample_ids):
        item = train[i]
        text = np.concatenate([item["tokens"].numpy(), item["labels"][-1:].numpy()])
        src = batch.src[row][batch.src_mask[row]].numpy()[:-1]           # drop EOS
        tgt = batch.labels[row][batch.loss_mask[row] > 0].numpy()[:-1]
        assert np.array_equal(reconstruct(src, tgt, reader.sentinels), text)
    again = reader.get(0, 0)
    assert (again.src == batch.src).all(), "noise is seeded by the sample id"


def test_dp2_zero3_equals_single_process_and_generates(tmp_path, capsys):
    ref, par = tmp_path / "ref", tmp_path / "dp2"
    assert main(["train", *sum((["--set", o] for o in run_overrides(ref)), [])]) == 0
    torchrun(2, run_overrides(par, **{"parallel.zero_stage": 3}))
    a, b = read_losses(ref), read_losses(par)
    assert len(a) == 5 and b == pytest.approx(a, rel=1e-5)
    wa, wb = final_weights(ref), final_weights(par)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= ATOL, k
    capsys.readouterr()
    assert main(["generate", str(ref / "checkpoints" / "step_5"), "--prompt", "def main(",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_tensor_parallel_is_refused_for_encoder_decoder(tmp_path, capsys):
    args = run_overrides(tmp_path / "x", **{"parallel.tp": 2})
    from llmtrain.config import ConfigError
    with pytest.raises(ConfigError, match="parallel.tp=2 with model.arch=encoder_decoder"):
        load_config(None, args, world_size=2)
