"""Tokenizer worker processes for `llmtrain preprocess --workers N`.

Kept free of torch/numpy imports: a spawned worker starts in well under a second.
"""

from __future__ import annotations

_TOK = None


def init(tokenizer_json: str) -> None:
    global _TOK
    from tokenizers import Tokenizer
    _TOK = Tokenizer.from_str(tokenizer_json)


def encode(texts: list[str]) -> list[list[int]]:
    return [e.ids for e in _TOK.encode_batch(texts, add_special_tokens=False)]
