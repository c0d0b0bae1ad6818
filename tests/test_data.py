"""Data pipeline: preprocess CLI, megatron-core compatibility, blending, sharding, resume order,
EOD handling, span corruption, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import as_overrides, cli_train, read_losses, run_dir_of
from llmtrain.cli import main
from llmtrain.config import ConfigError, load_config
from llmtrain.data.loader import BatchReader, build_datasets, check_vocab, _doc_ids
from llmtrain.data.preprocess import preprocess, token_dtype, write_indexed
from llmtrain.data.span_corruption import corrupt, noise_mask, reconstruct
from llmtrain.data.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def make_jsonl(path: Path, n_docs: int, seed: int, field: str = "text") -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            words = rng.choice(WORDS, size=int(rng.integers(20, 80)))
            f.write(json.dumps({field: " ".join(words)}) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    make_jsonl(d / "a.jsonl", 300, 0)
    stats = preprocess([str(d / "a.jsonl")], str(d / "a"), "train:300", progress=False,
                       log=lambda *a: None)
    return d, stats


def test_preprocess_output_is_megatron_indexed_dataset(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    d, stats = corpus
    tok = Tokenizer.load(d / "a.tokenizer.json")
    ds = IndexedDataset(str(d / "a"))
    assert len(ds) == stats["documents"] == 300
    assert ds.index.dtype == np.uint16 == token_dtype(tok.vocab_size)
    first = json.loads((d / "a.jsonl").read_text().splitlines()[0])["text"]
    assert ds[0].tolist() == tok.encode(first) + [tok.eod], "document 0 + EOD, unchanged"
    assert int(ds.sequence_lengths.sum()) == stats["tokens"]
    assert token_dtype(70000) == np.int32


def test_preprocess_workers_give_identical_files(corpus, tmp_path):
    d, _ = corpus
    preprocess([str(d / "a.jsonl")], str(tmp_path / "w2"), str(d / "a.tokenizer.json"),
               workers=2, progress=False, log=lambda *a: None)
    assert (tmp_path / "w2.bin").read_bytes() == (d / "a.bin").read_bytes()
    assert (tmp_path / "w2.idx").read_bytes() == (d / "a.idx").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["--input", "{d}/missing*.jsonl"], "matches no file"),
    (["--input", "{d}/a.jsonl", "--text-field", "body"], "--text-field='body' is not a field"),
    (["--input", "{d}/empty.jsonl"], "no non-empty document"),
    (["--input", "{d}/a.jsonl", "--tokenizer", "train:abc"], "VOCAB must be an integer"),
])
def test_preprocess_errors_are_one_line_and_write_nothing(corpus, tmp_path, capsys, args, message):
    d, _ = corpus
    (d / "empty.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    argv = ["preprocess", "--output", str(tmp_path / "out"), "--quiet"]
    argv += [a.format(d=d) for a in args]
    if "--tokenizer" not in argv:
        argv += ["--tokenizer", str(d / "a.tokenizer.json")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("out*")), "nothing half-written"


def test_interrupted_write_leaves_no_complete_pair(tmp_path):
    def docs():
        yield [1, 2, 3]
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_indexed(docs(), tmp_path / "x", 100)
    assert list(tmp_path.iterdir()) == []


def test_tokens_outside_vocab_are_caught_at_load(tmp_path):
    write_indexed([[5, 900, 0]], tmp_path / "big", 1000)
    check_vocab(str(tmp_path / "big"), 1000)
    with pytest.raises(ConfigError, match="token id 900 >= model.vocab_size=512"):
        check_vocab(str(tmp_path / "big"), 512)


def _cfg(tmp_path, **extra):
    base = {"model.vocab_size": 512, "train.seq_len": 16, "model.max_seq_len": 16,
            "train.global_batch_size": 8, "train.micro_batch_size": 2, "train.steps": 50,
            "data.source": "indexed", "logging.run_dir": str(tmp_path / "run")}
    base.update(extra)
    return load_config(None, as_overrides(base))


def test_blend_matches_weights(corpus, tmp_path):
    d, _ = corpus
    make_jsonl(tmp_path / "b.jsonl", 300, 1)
    preprocess([str(tmp_path / "b.jsonl")], str(tmp_path / "b"), str(d / "a.tokenizer.json"),
               progress=False, log=lambda *a: None)
    cfg = _cfg(tmp_path, **{"data.paths": f"[{d}/a]", "train.steps": 1250,
                            "data.blend": f"[[0.3, {d}/a], [0.7, {tmp_path}/b]]"})
    tok = Tokenizer.load(d / "a.tokenizer.json")
    train, _ = build_datasets(cfg, str(d / "a"), tok)
    assert len(train) >= 10_000
    share = np.bincount(train.dataset_index[:10_000], minlength=2) / 10_000
    assert abs(share[0] - 0.3) < 0.01 and abs(share[1] - 0.7) < 0.01


def test_sharding_is_disjoint_and_independent_of_dp(corpus, tmp_path):
    d, _ = corpus
    cfg = _cfg(tmp_path, **{"data.paths": f"[{d}/a]"})
    tok = Tokenizer.load(d / "a.tokenizer.json")
    train, _ = build_datasets(cfg, str(d / "a"), tok)
    one = BatchReader(train, cfg, tok, 0, 1)
    for step in range(3):
        whole = [i for m in range(one.n_micro) for i in one.sample_ids(step, m)]
        for dp in (2, 4):
            parts = [[i for m in range(r.n_micro) for i in r.sample_ids(step, m)]
                     for r in (BatchReader(train, cfg, tok, k, dp) for k in range(dp))]
            assert sum(parts, []) == whole, "ranks' slices concatenate to the global batch"
            assert len(set(sum(parts, []))) == len(whole)
        batch = one.get(step, 0)
        assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])


def test_each_sample_once_per_epoch_across_a_resume_with_other_dp(corpus, tmp_path):
    d, _ = corpus
    cfg = _cfg(tmp_path, **{"data.paths": f"[{d}/a]"})
    tok = Tokenizer.load(d / "a.tokenizer.json")
    train, _ = build_datasets(cfg, str(d / "a"), tok)
    n = len(train)
    steps_per_epoch = n // 8
    seen = []
    for step in range(2 * steps_per_epoch):
        dp = 1 if step < steps_per_epoch // 2 else 2  # "resumed" half way with dp=2
        for r in range(dp):
            reader = BatchReader(train, cfg, tok, r, dp)
            seen += [i for m in range(reader.n_micro) for i in reader.sample_ids(step, m)]
    first, second = seen[:steps_per_epoch * 8], seen[n:n + steps_per_epoch * 8]
    assert len(set(first)) == len(first), "no repeats inside epoch 0"
    assert len(set(second)) == len(second), "no repeats inside epoch 1"
    assert first != second, "epoch 1 is reshuffled"


def test_doc_ids_and_eod_loss_mask(corpus, tmp_path):
    assert _doc_ids(torch.tensor([[5, 0, 6, 7, 0, 8]]), eod=0).tolist() == [[0, 0, 1, 1, 1, 2]]
    d, _ = corpus
    tok = Tokenizer.load(d / "a.tokenizer.json")
    cfg = _cfg(tmp_path, **{"data.paths": f"[{d}/a]", "data.mask_eod_loss": True,
                            "data.reset_attention_at_eod": True})
    train, _ = build_datasets(cfg, str(d / "a"), tok)
    reader = BatchReader(train, cfg, tok)
    batch = next(b for b in (reader.get(s, 0) for s in range(50)) if (b.tokens == tok.eod).any())
    assert batch.doc_ids is not None
    row, pos = map(int, torch.nonzero(batch.tokens == tok.eod)[0])
    if pos + 1 < batch.tokens.shape[1]:
        assert batch.doc_ids[row, pos + 1] == batch.doc_ids[row, pos] + 1
    assert torch.all(batch.loss_mask[batch.tokens == tok.eod] == 0)
    assert torch.all(batch.loss_mask[batch.tokens != tok.eod] == 1)


def test_span_corruption_follows_t5():
    rng = np.random.default_rng(0)
    sentinels = list(range(1000, 1100))
    ratios, span_lens = [], []
    for _ in range(300):
        tokens = rng.integers(0, 900, size=512)
        inputs, targets = corrupt(tokens, sentinels, rng, noise_density=0.15, mean_span_length=3)
        assert np.array_equal(reconstruct(inputs, targets, sentinels), tokens)
        mask = noise_mask(512, 0.15, 3.0, np.random.default_rng(int(rng.integers(1 << 30))))
        ratios.append(mask.mean())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
        span_lens += list(edges[1::2] - edges[::2])
    assert abs(np.mean(ratios) - 0.15) < 0.002
    assert abs(np.mean(span_lens) - 3.0) < 0.1


def test_train_on_preprocessed_corpus_with_eod_reset(corpus, tiny):
    d, _ = corpus
    overrides = tiny(**{"data.source": "indexed", "data.paths": f"[{d}/a]",
                        "model.vocab_size": 512, "data.reset_attention_at_eod": True,
                        "data.mask_eod_loss": True})
    assert cli_train(overrides) == 0
    losses = read_losses(run_dir_of(overrides))
    assert len(losses) == 6 and losses[-1] < losses[0]
