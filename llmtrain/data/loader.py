"""Samples for training and evaluation, through megatron-core's GPTDataset.

The order of samples is a pure function of the seed: the global batch of step `s` is samples
`[s * G, (s + 1) * G)` of the shuffled training split, whatever the number of data-parallel ranks.
A rank takes its own contiguous slice of that global batch. So the data position is just the
step number, which makes resume exact and independent of the layout.

For a single corpus megatron-core builds exactly one epoch (its shuffle then does not depend on
`train.steps`, so extending a run keeps the order); epoch e > 0 visits that epoch through a
permutation seeded by (seed, e): every sample once per epoch. A blend (`data.blend`) is built for
`train.steps` global batches, since megatron-core sizes the mixture up front.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from llmtrain.config import Config, ConfigError
from llmtrain.config.errors import short
from llmtrain.config.layout import micro_batches
from llmtrain.config.validate import split_shares
from llmtrain.data.indexed import (PAIR_SUFFIXES, blend_entries, check_datasets, check_indexed,
                                   check_pairs)
from llmtrain.data.mcore import import_datasets
from llmtrain.data.span_corruption import N_SENTINELS, SENTINEL, corrupt, span_counts
from llmtrain.data.tokenizer import Tokenizer


@dataclass
class Batch:
    tokens: torch.Tensor       # [B, T] int64 inputs
    labels: torch.Tensor       # [B, T] int64 next tokens
    loss_mask: torch.Tensor    # [B, T] float, 0 where the loss is not taken
    doc_ids: torch.Tensor | None  # [B, T] document index inside the row (reset_attention_at_eod)
    sample_ids: list[int]      # indices into the split, for logging/debugging
    src: torch.Tensor | None = None       # [B, S] encoder input (encoder-decoder models)
    src_mask: torch.Tensor | None = None  # [B, S] bool, True = real token
    # [T] or [B, T] position of each token (rope / learned positions); None = 0..T-1. Set where
    # positions restart per document (reset_attention_at_eod) or tokens are a context-parallel
    # part of the sequence (`context_part`); doc_ids then still cover the whole sequence.
    positions: torch.Tensor | None = None


def _split_sizes(cfg: Config) -> list[int]:
    """Samples per split. One sample asks megatron-core for exactly one epoch of a single corpus.
    Validation: one fixed set that every evaluation reuses (comparable across steps)."""
    t = cfg.train
    if not cfg.data.blend:
        return [1, 1, 0]
    return [t.steps * t.global_batch_size, t.eval_steps * t.global_batch_size, 0]


def check_tokenizer_fits(tok: Tokenizer, cfg: Config) -> None:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} entries but model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size to at least "
                          f"{tok.vocab_size}")


def build_datasets(cfg: Config, prefix: str, tok: Tokenizer):
    """(train, valid) GPTDatasets over `prefix` (or over `data.blend`), with megatron's split."""
    import_datasets()
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    logging.getLogger("megatron.core").setLevel(logging.WARNING)
    check_tokenizer_fits(tok, cfg)
    check_datasets(cfg, prefix)
    d, t = cfg.data, cfg.train
    if d.blend:
        entries = blend_entries(cfg)
        blend = ([p for _, _, p in entries], [w for _, w, _ in entries])
    else:
        blend = ([prefix], None)
    sizes = _split_sizes(cfg)
    for path in blend[0]:  # before GPTDatasetConfig, which parses data.split with assertions
        check_split_has_sequences(path, d.split, sizes)
    gcfg = GPTDatasetConfig(
        random_seed=t.seed, sequence_length=t.seq_len, blend=blend, split=d.split,
        tokenizer=tok, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=d.mask_eod_loss, create_attention_mask=False,
        path_to_cache=None, mid_level_dataset_surplus=0.005)
    try:
        train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                        gcfg).build()
    except (AssertionError, ValueError, RuntimeError) as e:
        raise ConfigError(f"could not build datasets from {blend[0]} with data.split="
                          f"{d.split!r}: {e}") from None
    if train is None or len(train) == 0:
        raise ConfigError(f"data.split={d.split!r} leaves no training samples")
    if valid is None or len(valid) == 0:
        raise ConfigError(f"data.split={d.split!r} leaves no validation samples; give the "
                          f"validation split a share, e.g. 98,2,0")
    return train, valid


def split_fractions(split: str) -> list[float]:
    """data.split as megatron-core reads it: the normalised training, validation and test
    shares (the string checked first: `split_shares`)."""
    split_shares(split)
    import_datasets()
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
    return parse_and_normalize_split(split)


def split_ranges(split: str, n: int) -> list[range]:
    """The training, validation and test sequences of a corpus of n, cut as megatron-core's
    builder cuts them (`_build_megatron_dataset_splits`): at the rounded cumulative shares."""
    fractions = split_fractions(split)  # imports megatron-core's dataset modules alone
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix)
    matrix = convert_split_vector_to_split_matrix(fractions)
    return [range(0) if b is None else
            range(int(round(b[0] * float(n))), int(round(b[1] * float(n)))) for b in matrix]


def check_split_has_sequences(prefix: str, split: str, sizes: list[int], n: int | None = None,
                              unit: str = "document") -> list[range]:
    """The `split_ranges` of the corpus at `prefix` (`n` sequences, default: its index's count),
    once every split the run samples from (sizes[i] > 0) holds at least one. megatron-core would
    loop forever on an empty one (`_get_num_epochs` adds an empty epoch's zero tokens until it
    has the samples asked for): 9 documents at 98,2,0 did. The pair path cuts its pairs here
    too, so both paths split a corpus of the same count alike."""
    n = check_indexed(prefix).sequences if n is None else n
    ranges = split_ranges(split, n)
    for name, r, size in zip(("training", "validation"), ranges, sizes):
        if size and not r:
            raise ConfigError(f"data.split={short(split)} gives the {name} split none of the {n} "
                              f"{unit}s of {prefix}; use a larger corpus or give that split "
                              f"a larger share (each split needs at least one {unit})")
    return ranges


def _doc_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document index of every position: it increments right after each EOD token."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] position of every token inside its document: 0 at each document's first token
    (Megatron-LM's reset_position_ids), so a packed document is placed as if it stood alone."""
    T = doc_ids.shape[-1]
    idx = torch.arange(T).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[..., 1:] = doc_ids[..., 1:] != doc_ids[..., :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - first


def context_part(batch: Batch, cp_rank: int, cp_size: int) -> Batch:
    """The part of `batch` a context-parallel rank keeps (parallel/context.py): the contiguous
    tokens [r T/cp, (r+1) T/cp) of every sequence, their labels, loss mask and positions; the
    document ids stay whole (the attention mask covers the whole sequence)."""
    t = batch.tokens.shape[1] // cp_size
    part = slice(cp_rank * t, (cp_rank + 1) * t)
    positions = (torch.arange(part.start, part.stop) if batch.positions is None
                 else batch.positions[:, part])
    return Batch(batch.tokens[:, part], batch.labels[:, part], batch.loss_mask[:, part],
                 batch.doc_ids, batch.sample_ids, positions=positions)


class EpochOrder:
    """Global sample number -> dataset index: epoch 0 in the dataset's own (shuffled) order,
    epoch e > 0 through a permutation seeded by (seed, e)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = 0, None

    def __call__(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch == 0:
            return j
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return int(self._perm[j])


class BatchReader:
    """Micro-batches of one data-parallel rank, addressed by (step, micro-batch index); with
    context parallelism, this cp rank's part of them (the cp ranks of a dp rank read the same
    samples)."""

    def __init__(self, dataset, cfg: Config, tok: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 cp_rank: int = 0, cp_size: int = 1):
        t = cfg.train
        self.ds, self.tok = dataset, tok
        self.order = EpochOrder(len(dataset), t.seed)
        self.G, self.mb = t.global_batch_size, t.micro_batch_size
        self.per_rank = self.G // dp_size
        self.n_micro = micro_batches(self.G, self.mb, dp_size)
        self.offset = dp_rank * self.per_rank
        self.reset_at_eod = cfg.data.reset_attention_at_eod
        self.cp_rank, self.cp_size = cp_rank, cp_size
        # A cp rank's model sees T/cp tokens but must know the whole length S for the mask of a
        # sliding window: it takes S from doc_ids, so they are passed (one document per row)
        # where the data has none (Transformer.forward's contract). Such a mask is dense anyway.
        self.whole_length_ids = cp_size > 1 and cfg.model.attention_window > 0

    def sample_ids(self, step: int, micro: int) -> list[int]:
        start = step * self.G + self.offset + micro * self.mb
        return [self.order(i) for i in range(start, start + self.mb)]

    def get(self, step: int, micro: int) -> Batch:
        ids = self.sample_ids(step, micro)
        items = [self.ds[i] for i in ids]
        tokens = torch.stack([it["tokens"] for it in items])
        labels = torch.stack([it["labels"] for it in items])
        mask = torch.stack([it["loss_mask"] for it in items]).float()
        doc_ids = _doc_ids(tokens, self.tok.eod) if self.reset_at_eod else None
        if doc_ids is None and self.whole_length_ids:
            doc_ids = torch.zeros_like(tokens)
        positions = None if doc_ids is None else document_positions(doc_ids)
        batch = Batch(tokens, labels, mask, doc_ids, ids, positions=positions)
        return context_part(batch, self.cp_rank, self.cp_size) if self.cp_size > 1 else batch


def check_vocab(prefix: str, vocab_size: int, where: str | None = None) -> None:
    """Tokens outside the model's vocabulary fail at load with the offending id, not mid-run
    (after `check_indexed`, which makes the .bin size agree with its index)."""
    info = check_indexed(prefix, where)
    tokens = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r")
    chunk = 1 << 24
    top, low = 0, 0
    for i in range(0, len(tokens), chunk):
        part = tokens[i:i + chunk]
        top = max(top, int(part.max()))
        if info.dtype.kind == "i":
            low = min(low, int(part.min()))
    del tokens
    if low < 0:
        raise ConfigError(f"{prefix}.bin holds token id {low} < 0; the dataset is damaged or was "
                          f"written with another dtype than its index says ({info.dtype.name})")
    if top >= vocab_size:
        raise ConfigError(f"{prefix}.bin holds token id {top} >= model.vocab_size={vocab_size}; "
                          f"raise model.vocab_size to at least {top + 1}")


def sentinel_ids(tok: Tokenizer, vocab_size: int, n: int = N_SENTINELS) -> list[int]:
    """T5 sentinels: the tokenizer's `<extra_id_i>` tokens, else the top `n` ids of the model's
    vocabulary when the tokenizer leaves them free (T5 puts them at the end of its vocabulary)."""
    ids = [tok.hf.token_to_id(SENTINEL.format(i)) for i in range(n)]
    if all(i is not None for i in ids):
        return ids
    if tok.vocab_size + n <= vocab_size:
        return list(range(vocab_size - 1, vocab_size - 1 - n, -1))
    raise ConfigError(f"span corruption needs {n} sentinel ids: the tokenizer has no "
                      f"<extra_id_i> tokens and model.vocab_size={vocab_size} leaves only "
                      f"{vocab_size - tok.vocab_size} ids above its {tok.vocab_size} entries; "
                      f"raise model.vocab_size to at least {tok.vocab_size + n}")


def _pad(rows: list[np.ndarray], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(np.array(r, dtype=np.int64))
        mask[i, :len(r)] = True
    return out, mask


class SpanCorruptionReader(BatchReader):
    """Encoder-decoder batches by T5 span corruption (noise density 0.15, mean span 3) of the
    same packed samples the decoder-only path reads: the source is the corrupted text + EOS,
    the target the sentinel-delimited spans + EOS; the decoder input is the target shifted
    right behind the start token (pad, as T5). The noise of a sample is seeded by (seed, sample
    id), so it is the same on every run and layout."""

    def __init__(self, dataset, cfg: Config, tok: Tokenizer, dp_rank: int = 0, dp_size: int = 1,
                 noise_density: float = 0.15, mean_span_length: float = 3.0):
        super().__init__(dataset, cfg, tok, dp_rank, dp_size)
        self.sentinels = sentinel_ids(tok, cfg.model.vocab_size)
        self.noise_density, self.mean_span = noise_density, mean_span_length
        self.seed = cfg.train.seed
        # a sample is seq_len + 1 tokens; each noise span takes one sentinel: check now, not at
        # the first batch
        spans = lambda n: span_counts(n + 1, noise_density, mean_span_length)[1]  # noqa: E731
        if spans(cfg.train.seq_len) > len(self.sentinels):
            most = next(n for n in range(cfg.train.seq_len, 0, -1)
                        if spans(n) <= len(self.sentinels))
            raise ConfigError(f"train.seq_len={cfg.train.seq_len} gives span corruption "
                              f"{spans(cfg.train.seq_len)} noise spans per sample but there are "
                              f"{len(self.sentinels)} sentinel tokens; use train.seq_len <= "
                              f"{most}")
        self.start = tok.pad if tok.pad >= 0 else tok.eod

    def get(self, step: int, micro: int) -> Batch:
        ids = self.sample_ids(step, micro)
        srcs, tgts = [], []
        for i in ids:
            item = self.ds[i]
            text = torch.cat([item["tokens"], item["labels"][-1:]]).numpy()
            rng = np.random.default_rng([self.seed, i])
            src, tgt = corrupt(text, self.sentinels, rng, self.noise_density, self.mean_span,
                               eos=self.tok.eod)
            srcs.append(src)
            tgts.append(tgt)
        return _seq2seq_batch(srcs, tgts, self.start, ids)


def _seq2seq_batch(srcs: list[np.ndarray], tgts: list[np.ndarray], start: int,
                   ids: list[int]) -> Batch:
    """Padded encoder inputs and targets; the decoder input is the target shifted right behind
    the start token; the loss covers every real target token."""
    src, src_mask = _pad(srcs, start)
    labels, tgt_mask = _pad(tgts, start)
    tgt_in = torch.cat([torch.full((len(ids), 1), start), labels[:, :-1]], dim=1)
    return Batch(tgt_in, labels, tgt_mask.float(), None, ids, src, src_mask)


# ----------------------------------------------------------------------------------------------
# Sequence-to-sequence pairs (data.source_field / data.target_field)


class PairDataset:
    """Pairs (source tokens, target tokens) of the aligned PREFIX_src / PREFIX_tgt indexed
    datasets (each document ends with EOD), restricted to `docs` (a split, in its order)."""

    def __init__(self, prefix: str, docs: np.ndarray):
        import_datasets()
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        check_pairs(prefix)
        self.src, self.tgt = (IndexedDataset(prefix + s) for s in PAIR_SUFFIXES)
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        d = int(self.docs[i])
        return self.src[d], self.tgt[d]


def build_pair_datasets(cfg: Config, prefix: str,
                        tok: Tokenizer) -> tuple[PairDataset, PairDataset]:
    """(train, valid) over the pairs, split by `data.split` in corpus order as megatron-core
    splits documents (`check_split_has_sequences`); the training pairs are shuffled once by the
    seed (epoch 0), later epochs by EpochOrder."""
    check_tokenizer_fits(tok, cfg)
    train, valid, _ = check_split_has_sequences(prefix, cfg.data.split, [1, 1, 0],
                                                n=check_pairs(prefix), unit="pair")
    order = np.random.default_rng(cfg.train.seed).permutation(len(train))
    return PairDataset(prefix, np.array(train)[order]), PairDataset(prefix, np.array(valid))


class Seq2SeqReader(BatchReader):
    """Encoder-decoder batches from source -> target pairs: each side truncated to
    train.seq_len tokens (keeping its final EOS)."""

    def __init__(self, dataset, cfg: Config, tok: Tokenizer, dp_rank: int = 0, dp_size: int = 1):
        super().__init__(dataset, cfg, tok, dp_rank, dp_size)
        self.max_len = cfg.train.seq_len
        self.start = tok.pad if tok.pad >= 0 else tok.eod

    def _clip(self, doc: np.ndarray) -> np.ndarray:
        if len(doc) <= self.max_len:
            return doc
        return np.append(doc[:self.max_len - 1], self.tok.eod)

    def get(self, step: int, micro: int) -> Batch:
        ids = self.sample_ids(step, micro)
        pairs = [self.ds[i] for i in ids]
        return _seq2seq_batch([self._clip(s) for s, _ in pairs], [self._clip(t) for _, t in pairs],
                              self.start, ids)
