"""megatron-core indexed datasets on disk (PREFIX.bin/.idx), and the aligned pairs of a
sequence-to-sequence corpus (PREFIX_src, PREFIX_tgt): their layout and the checks run before
megatron-core opens them.

Its own module because both sides of the format use it: preprocess.py writes such corpora (and
checks a cached one before reusing it), loader.py reads them.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from llmtrain.config import Config, ConfigError

# a sequence-to-sequence corpus is two aligned indexed datasets: PREFIX_src and PREFIX_tgt
PAIR_SUFFIXES = ("_src", "_tgt")

# megatron-core's .idx layout (indexed_dataset._IndexWriter): the magic, the version (u64, 1), the
# token dtype code (u8), the sequence count S (u64) and the document-boundary count D (u64); then
# S int32 sequence lengths (tokens), S int64 byte offsets into the .bin, D int64 document
# boundaries (sequence indices rising from 0 to S) and, in multimodal datasets only, S int8 modes.
_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEAD = struct.Struct("<9sQBQQ")  # 34 bytes
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_CHUNK = 1 << 22  # index entries checked per numpy pass: bounded temporaries on any corpus


@dataclass(frozen=True)
class IndexedInfo:
    """What a checked PREFIX.idx describes."""
    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int


_checked: dict[tuple, IndexedInfo] = {}


def check_indexed(prefix: str, where: str | None = None) -> IndexedInfo:
    """Check the megatron-core indexed dataset PREFIX.bin/.idx before anything opens it: the
    header (magic, version, dtype code), the counts against the .idx size, the sequence lengths
    against the .bin size, every sequence's byte range inside the .bin and the document
    boundaries. megatron-core's reader would assert, or read past the end at step N, on a
    damaged or mismatched pair. The .idx is read with bounded reads (a header, then memory-mapped
    chunks). A problem is a one-line ConfigError starting with `where` (default: the prefix).
    Checked files are remembered by path, size and mtime, so later calls cost nothing."""
    where = where or repr(prefix)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    stats = _stat_files((bin_, idx), where)
    key = tuple((os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ino)
                for p, st in zip((bin_, idx), stats))
    if key in _checked:
        return _checked[key]
    bin_size, idx_size = stats[0].st_size, stats[1].st_size
    dtype, n_seq, n_bounds = _check_idx_header(idx, idx_size, where)
    tokens = _check_idx_body(idx, bin_, bin_size, dtype, n_seq, n_bounds, where)
    info = IndexedInfo(dtype, n_seq, n_bounds - 1, tokens)
    _checked[key] = info
    return info


def _fail(where: str, msg: str) -> NoReturn:
    raise ConfigError(f"{where}: {msg}")


def _stat_files(paths: tuple[str, ...], where: str) -> list[os.stat_result]:
    """The stat of each path, which must be an existing file."""
    stats = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            _fail(where, f"{path} does not exist")
        if not os.path.isfile(path):
            _fail(where, f"{path} is not a file")
        stats.append(st)
    return stats


def _check_idx_header(idx: str, idx_size: int, where: str) -> tuple[np.dtype, int, int]:
    """(token dtype, sequence count, document-boundary count) of a valid .idx header whose
    counts match the file's size."""
    if idx_size < _IDX_HEAD.size:
        _fail(where, f"{idx} holds {idx_size} bytes, less than the {_IDX_HEAD.size}-byte header "
              f"of a megatron-core index; it is {'empty' if idx_size == 0 else 'truncated'}")
    try:
        with open(idx, "rb") as f:
            head = f.read(_IDX_HEAD.size)
    except OSError as e:
        _fail(where, f"cannot read {idx} ({e.strerror})")
    magic, version, code, n_seq, n_bounds = _IDX_HEAD.unpack(head)
    if magic != _IDX_MAGIC:
        _fail(where, f"{idx} is not a megatron-core index (it starts with {magic!r}, not "
              f"{_IDX_MAGIC!r})")
    if version != 1:
        _fail(where, f"{idx} has index version {version}; megatron-core indexes are version 1")
    if code not in _IDX_DTYPES:
        _fail(where, f"{idx} has token dtype code {code}; valid codes are "
              + ", ".join(f"{c} ({np.dtype(t).name})" for c, t in _IDX_DTYPES.items()))
    body = _IDX_HEAD.size + 12 * n_seq + 8 * n_bounds
    if idx_size not in (body, body + n_seq):  # + one int8 mode per sequence if multimodal
        _fail(where, f"{idx} holds {idx_size} bytes but its header counts {n_seq} sequences and "
              f"{n_bounds} document boundaries ({body} bytes); the index is truncated or damaged")
    if n_seq == 0 or n_bounds < 2:
        _fail(where, f"{idx} describes no documents; the dataset is empty")
    return np.dtype(_IDX_DTYPES[code]), n_seq, n_bounds


def _check_idx_body(idx: str, bin_: str, bin_size: int, dtype: np.dtype, n_seq: int,
                    n_bounds: int, where: str) -> int:
    """Check the .idx arrays against the .bin (memory-mapped, in chunks); the token count."""
    buf = np.memmap(idx, dtype=np.uint8, mode="r")
    off = _IDX_HEAD.size
    lengths = np.frombuffer(buf, np.int32, n_seq, off)
    pointers = np.frombuffer(buf, np.int64, n_seq, off + 4 * n_seq)
    bounds = np.frombuffer(buf, np.int64, n_bounds, off + 12 * n_seq)
    item = dtype.itemsize
    tokens = _count_tokens(lengths, idx, where)
    if tokens * item != bin_size:
        why = ("the dataset is truncated or its index belongs to another file"
               if bin_size < tokens * item else "its index belongs to another file")
        _fail(where, f"{bin_} holds {bin_size} bytes but {idx} describes {tokens * item}; {why}")
    _check_offsets(lengths, pointers, item, bin_size, idx, bin_, where)
    _check_bounds(bounds, n_seq, idx, where)
    del lengths, pointers, bounds, buf
    return tokens


def _count_tokens(lengths: np.ndarray, idx: str, where: str) -> int:
    """The sum of the sequence lengths, none of which may be negative."""
    tokens = 0
    for s in range(0, len(lengths), _CHUNK):
        part = lengths[s:s + _CHUNK]
        if part.min() < 0:
            i = int(np.argmax(part < 0))
            _fail(where, f"{idx} gives sequence {s + i} the length {int(part[i])}; the index is "
                  f"damaged")
        tokens += int(part.sum(dtype=np.int64))
    return tokens


def _check_offsets(lengths: np.ndarray, pointers: np.ndarray, item: int, bin_size: int,
                   idx: str, bin_: str, where: str) -> None:
    """Every sequence's byte range lies inside the .bin."""
    for s in range(0, len(lengths), _CHUNK):
        span = lengths[s:s + _CHUNK].astype(np.int64) * item  # each <= bin_size: no overflow
        start = pointers[s:s + _CHUNK]
        outside = (start < 0) | (start > bin_size - span)
        if outside.any():
            i = int(np.argmax(outside))
            _fail(where, f"{idx} places sequence {s + i} ({int(span[i])} bytes) at byte "
                  f"{int(start[i])}, beyond the {bin_size} bytes of {bin_}; the index is damaged")


def _check_bounds(bounds: np.ndarray, n_seq: int, idx: str, where: str) -> None:
    """The document boundaries rise from 0 to the sequence count."""
    if bounds[0] != 0 or bounds[-1] != n_seq:
        _fail(where, f"{idx}'s document boundaries run from {int(bounds[0])} to "
              f"{int(bounds[-1])}, not from 0 to its {n_seq} sequences; the index is damaged")
    for s in range(0, len(bounds) - 1, _CHUNK):
        falling = np.diff(bounds[s:s + _CHUNK + 1]) < 0
        if falling.any():
            i = s + int(np.argmax(falling))
            _fail(where, f"{idx}'s document boundary {i + 1} ({int(bounds[i + 1])}) is below "
                  f"the one before it ({int(bounds[i])}); the index is damaged")


def blend_entries(cfg: Config) -> list[tuple[str, float, str]]:
    """(where, weight, prefix) of every `data.blend` entry (validated by the config: each a
    [weight, prefix] pair)."""
    return [(f"data.blend[{i}]={p}", float(w), str(p))
            for i, (w, p) in enumerate(cfg.data.blend or ())]


def check_datasets(cfg: Config, prefix: str | None = None) -> None:
    """Check every indexed dataset a run will open: the `data.blend` prefixes, else `prefix`."""
    if cfg.data.blend:
        for where, _, p in blend_entries(cfg):
            check_indexed(p, where)
    elif prefix is not None:
        where = f"data.paths[0]={prefix}" if cfg.data.source == "indexed" else None
        check_indexed(prefix, where)


def check_pairs(prefix: str) -> int:
    """Check both aligned datasets of a pair corpus (`check_indexed`); the number of pairs."""
    src, tgt = (check_indexed(prefix + s) for s in PAIR_SUFFIXES)
    if src.sequences != tgt.sequences:
        raise ConfigError(f"{prefix!r}: {prefix}{PAIR_SUFFIXES[0]} holds {src.sequences} sources "
                          f"but {prefix}{PAIR_SUFFIXES[1]} {tgt.sequences} targets; the pair "
                          f"corpus is damaged (delete it to have it rebuilt)")
    return src.sequences
