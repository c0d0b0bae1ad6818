"""Tokenizers: a byte-level BPE trained with HF `tokenizers`, or a `tokenizer.json` / HF directory.

Special tokens come first so their ids do not depend on the corpus: `<|endoftext|>` = 0 (EOD,
written between documents), `<|pad|>` = 1. The wrapper exposes the attributes megatron-core's
datasets read (`eod`, `pad`, `vocab_size`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmtrain.config import ConfigError

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with the EOD/pad ids training needs."""

    def __init__(self, hf: HFTokenizer, path: str | None = None):
        self.hf = hf
        self.path = path
        self.eod = self._special_id((EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "[SEP]"))
        pad = hf.token_to_id(PAD_TOKEN)
        self.pad = pad if pad is not None else -1  # megatron-core: -1 = "no pad token"
        # megatron-core hashes this into its dataset cache key, which must be the same on every
        # rank: no path (rank 0 may hold the tokenizer it just trained, the others its file)
        self.unique_identifiers = {"class": "llmtrain.Tokenizer",
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    def _special_id(self, names: tuple[str, ...]) -> int:
        for name in names:
            tid = self.hf.token_to_id(name)
            if tid is not None:
                return tid
        raise ConfigError(f"tokenizer {self.path or ''} has no end-of-document token; add one of "
                          + ", ".join(names))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos(self) -> int:
        return self.eod

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        self.hf.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        if not p.is_file():
            raise ConfigError(f"data.tokenizer={str(path)!r}: no tokenizer.json found there")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ConfigError(f"data.tokenizer={str(path)!r} is not a valid tokenizer.json: "
                              f"{str(e).splitlines()[0]}") from None
        return cls(hf, str(p))

    @classmethod
    def train_bpe(cls, texts: Iterator[str], vocab_size: int,
                  extra_special: list[str] = ()) -> "Tokenizer":
        """Byte-level BPE (GPT-2 style) with exactly `vocab_size` entries when the corpus allows."""
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            special_tokens=[EOD_TOKEN, PAD_TOKEN, *extra_special],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)
