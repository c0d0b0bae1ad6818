"""Raw text -> tokenizer + megatron-core indexed dataset (`PREFIX.bin` / `PREFIX.idx`).

The on-disk format is megatron-core's own (`IndexedDatasetBuilder`), so corpora preprocessed for
Megatron-LM / GPT-NeoX load unchanged and ours load there. Each document is followed by the EOD
token. Files are written under temporary names and renamed, `.idx` last, so an interrupted run
never leaves a pair that looks complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from array import array
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from llmtrain.config import Config, ConfigError
from llmtrain.data.tokenizer import Tokenizer

_FORMATS = {".txt": "text", ".text": "text", ".py": "text", ".md": "text", ".json": "json",
            ".jsonl": "json", ".parquet": "parquet"}


# a sequence-to-sequence corpus is two aligned indexed datasets: PREFIX_src and PREFIX_tgt
PAIR_SUFFIXES = ("_src", "_tgt")


def token_dtype(vocab_size: int) -> type:
    """Smallest dtype that holds every id (megatron-core's rule: uint16 below 65500)."""
    return np.uint16 if vocab_size < 65500 else np.int32


# ----------------------------------------------------------------------------------------------
# Corpora


def stdlib_files() -> list[Path]:
    """The running Python's standard-library sources, minus its test suites (sorted: reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.parts))


def iter_stdlib_texts() -> Iterator[str]:
    for p in stdlib_files():
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield text


def expand_paths(patterns: Iterable[str], key: str = "data.paths") -> list[str]:
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        hits = [h for h in hits if os.path.isfile(h)]
        if not hits:
            raise ConfigError(f"{key}: {pat!r} matches no file")
        files.extend(hits)
    return files


def iter_file_texts(files: list[str], text_field: str = "text",
                    key: str = "data.text_field") -> Iterator[str]:
    """Stream documents through `datasets` (bounded memory whatever the corpus size).

    A `.txt` file is one document per file (`sample_by="document"`), jsonl/parquet one per row.
    """
    import itertools

    import datasets  # slow import: only when files are read

    datasets.disable_progress_bars()
    for path in files:
        if Path(path).suffix.lower() not in _FORMATS:
            raise ConfigError(f"{path!r} has an unknown extension; use one of "
                              + ", ".join(sorted(_FORMATS)))
    # one streaming dataset per run of same-format files (fast for many small files)
    for fmt, group in itertools.groupby(files, key=lambda f: _FORMATS[Path(f).suffix.lower()]):
        group = list(group)
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=group, split="train", streaming=True, **kwargs)
        field = "text" if fmt == "text" else text_field
        for row in ds:
            if field not in row:
                raise ConfigError(f"{key}={field!r} is not a field of {', '.join(group)[:200]} "
                                  f"(fields: {', '.join(row)})")
            text = row[field]
            if isinstance(text, str) and text.strip():
                yield text


def iter_file_pairs(files: list[str], source_field: str,
                    target_field: str) -> Iterator[tuple[str, str]]:
    """(source, target) of every jsonl/parquet row, streamed; a row whose source or target is
    empty is skipped (the same rows on every pass, so the two sides stay aligned)."""
    import datasets

    datasets.disable_progress_bars()
    for path in files:
        fmt = _FORMATS.get(Path(path).suffix.lower())
        if fmt in (None, "text"):
            raise ConfigError(f"{path!r}: sequence-to-sequence pairs are read from jsonl or "
                              f"parquet files (data.source_field/target_field)")
    for path in files:
        ds = datasets.load_dataset(_FORMATS[Path(path).suffix.lower()], data_files=[path],
                                   split="train", streaming=True)
        for row in ds:
            for key, field in (("data.source_field", source_field),
                               ("data.target_field", target_field)):
                if field not in row:
                    raise ConfigError(f"{key}={field!r} is not a field of {path} (fields: "
                                      f"{', '.join(row)})")
            src, tgt = row[source_field], row[target_field]
            if isinstance(src, str) and isinstance(tgt, str) and src.strip() and tgt.strip():
                yield src, tgt


# ----------------------------------------------------------------------------------------------
# Writing an indexed dataset


def write_indexed(docs: Iterable[list[int]], prefix: str | Path, vocab_size: int) -> dict:
    """Write token lists (one per document, EOD already appended) as megatron-core .bin/.idx."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    n_docs = n_tokens = 0
    try:
        for ids in docs:
            if not ids:
                continue
            builder.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
        builder.finalize(tmp + ".idx")
        if n_docs == 0:
            raise ConfigError("the corpus holds no non-empty document")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")  # last: the pair is complete only now
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return {"documents": n_docs, "tokens": n_tokens}


def encode_documents(texts: Iterable[str], tok: Tokenizer, batch: int = 256) -> Iterator[list[int]]:
    """Tokenize in batches (tokenizers parallelises a batch over cores) and append EOD."""
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) == batch:
            yield from (ids + [tok.eod] for ids in tok.encode_batch(buf))
            buf = []
    if buf:
        yield from (ids + [tok.eod] for ids in tok.encode_batch(buf))


# ----------------------------------------------------------------------------------------------
# The corpus a run trains on, cached by what determines it


def cache_root(cfg: Config) -> Path:
    root = cfg.data.cache_dir or os.environ.get("LLMTRAIN_CACHE") or "~/.cache/llmtrain"
    return Path(root).expanduser()


def _corpus_key(cfg: Config, files: list[str]) -> str:
    d = cfg.data
    ident = {"source": d.source, "vocab": cfg.model.vocab_size, "tokenizer": d.tokenizer,
             "text_field": d.text_field, "sentinels": cfg.model.arch == "encoder_decoder",
             "pairs": [d.source_field, d.target_field] if d.source_field else None,
             "python": sys.version.split()[0] if d.source == "stdlib"
             else None,
             "files": [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in files]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def prepare_corpus(cfg: Config, log=print) -> tuple[str, Tokenizer]:
    """Return (indexed-dataset prefix, tokenizer) for `cfg.data`, building them on first use.

    source=stdlib|files: tokenizer trained (or loaded from data.tokenizer) and the corpus written
    under the cache dir, keyed by a hash of everything that determines it.
    source=indexed: data.paths[0] is an existing prefix; data.tokenizer must name its tokenizer
    (or a tokenizer.json must lie next to the prefix).
    """
    d = cfg.data
    if d.source == "indexed":
        prefix = d.paths[0]
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ConfigError(f"data.paths[0]={prefix!r}: {prefix + ext} does not exist")
        tok_path = d.tokenizer or next(
            (p for p in (f"{prefix}.tokenizer.json", str(Path(prefix).parent / "tokenizer.json"))
             if os.path.isfile(p)), f"{prefix}.tokenizer.json")
        return prefix, Tokenizer.load(tok_path)

    files = [] if d.source == "stdlib" else expand_paths(d.paths)
    out = cache_root(cfg) / f"corpus-{d.source}-{_corpus_key(cfg, files)}"
    prefix = out / "data"
    tok_file = out / "tokenizer.json"
    last = f"{prefix}{PAIR_SUFFIXES[1]}.idx" if d.source_field else f"{prefix}.idx"
    if tok_file.is_file() and Path(last).is_file():
        return str(prefix), Tokenizer.load(tok_file)

    out.mkdir(parents=True, exist_ok=True)
    def texts() -> Iterator[str]:
        if d.source == "stdlib":
            yield from iter_stdlib_texts()
        elif d.source_field:  # sequence-to-sequence pairs: both sides train the tokenizer
            for pair in iter_file_pairs(files, d.source_field, d.target_field):
                yield from pair
        else:
            yield from iter_file_texts(files, d.text_field)
    if d.tokenizer:
        tok = Tokenizer.load(d.tokenizer)
    else:
        log(f"training a {cfg.model.vocab_size}-entry byte-level BPE tokenizer on the "
            f"{d.source} corpus (once; cached in {out})")
        # encoder-decoder models train by span corruption: T5's 100 sentinels join the vocabulary
        from llmtrain.data.loader import N_SENTINELS, SENTINEL
        extra = ([SENTINEL.format(i) for i in range(N_SENTINELS)]
                 if cfg.model.arch == "encoder_decoder" else [])
        tok = Tokenizer.train_bpe(texts(), cfg.model.vocab_size, extra_special=extra)
    if d.source_field:
        # two aligned indexed datasets, document i of each = the two sides of pair i
        log(f"tokenizing the {d.source_field} -> {d.target_field} pairs into {prefix}"
            f"{{{PAIR_SUFFIXES[0]},{PAIR_SUFFIXES[1]}}}.bin/.idx")
        for side, suffix in enumerate(PAIR_SUFFIXES):
            stats = write_indexed(encode_documents(
                (pair[side] for pair in iter_file_pairs(files, d.source_field, d.target_field)),
                tok), f"{prefix}{suffix}", tok.vocab_size)
        tok.save(tok_file)  # last: its presence marks the cache entry complete
        log(f"corpus ready: {stats['documents']} pairs; {stats['tokens']:,} target tokens")
        return str(prefix), tok
    log(f"tokenizing the {d.source} corpus into {prefix}.bin/.idx")
    stats = write_indexed(encode_documents(texts(), tok), prefix, tok.vocab_size)
    tok.save(tok_file)  # last: its presence marks the cache entry complete
    log(f"corpus ready: {stats['documents']} documents, {stats['tokens']:,} tokens")
    return str(prefix), tok


# ----------------------------------------------------------------------------------------------
# `llmtrain preprocess`: any corpus -> tokenizer + indexed dataset, streamed, multi-process

def _batched(texts: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for t in texts:
        buf.append(t)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _import_writer() -> None:
    import megatron.core.datasets.indexed_dataset  # noqa: F401


def resolve_tokenizer(spec: str, texts, log=print) -> Tokenizer:
    """`train:VOCAB` trains a byte-level BPE on `texts()`; anything else is a tokenizer path."""
    if spec.startswith("train:"):
        try:
            vocab = int(spec.split(":", 1)[1])
        except ValueError:
            vocab = 0
        if vocab < 260:
            raise ConfigError(f"--tokenizer {spec!r}: VOCAB must be an integer >= 260 (256 bytes + "
                              f"special tokens), e.g. train:32000")
        log(f"training a {vocab}-entry byte-level BPE tokenizer")
        return Tokenizer.train_bpe(texts(), vocab)
    return Tokenizer.load(spec)


def preprocess(inputs: list[str], output: str, tokenizer: str, text_field: str = "text",
               workers: int = 1, append_eod: bool = True, batch_docs: int = 512,
               progress: bool = True, log=print) -> dict:
    """Stream `inputs` through `datasets`, tokenize with `workers` processes, write OUTPUT.bin/.idx
    and OUTPUT.tokenizer.json. Returns counts and rates."""
    import multiprocessing as mp
    import threading
    import time

    from llmtrain.data import _tokenize_worker

    # megatron-core's package import takes seconds; overlap it with reading and tokenizing.
    threading.Thread(target=_import_writer, daemon=True).start()
    files = expand_paths(inputs, key="--input")
    texts = lambda: iter_file_texts(files, text_field, key="--text-field")  # noqa: E731
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = resolve_tokenizer(tokenizer, texts, log)
    eod = [tok.eod] if append_eod else []
    eod_array = array("i", eod)  # appended to the int32 arrays the workers send back
    stats = {"documents": 0, "tokens": 0, "bytes": 0}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit="doc", desc="preprocess", dynamic_ncols=True, mininterval=0.5)
    t0 = time.perf_counter()

    def count(batch: list[str]) -> list[str]:
        stats["bytes"] += sum(len(t.encode("utf-8")) for t in batch)
        return batch

    def docs() -> Iterator[list[int]]:
        batches = (count(b) for b in _batched(texts(), batch_docs))
        if workers > 1:
            ctx = mp.get_context("spawn")  # fork after tokenizers' thread pool started can deadlock
            with ctx.Pool(workers, _tokenize_worker.init, (tok.hf.to_str(),)) as pool:
                yield from _account(pool.imap(_tokenize_worker.encode, batches, chunksize=1))
        else:
            yield from _account(map(tok.encode_batch, batches))

    def _account(encoded: Iterable[list]) -> Iterator:
        for batch in encoded:
            for ids in batch:  # a list (in process) or an int32 array (from a worker)
                stats["documents"] += 1
                stats["tokens"] += len(ids) + len(eod)
                yield ids + (eod if isinstance(ids, list) else eod_array)
            if bar is not None:
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.n = stats["documents"]
                bar.set_postfix_str(f"{stats['tokens']:,} tokens, "
                                    f"{stats['bytes'] / dt / 2**20:.1f} MB/s", refresh=False)
                bar.refresh()

    try:
        write_indexed(docs(), out, tok.vocab_size)
    finally:
        if bar is not None:
            bar.close()
    tok.save(f"{out}.tokenizer.json")
    dt = time.perf_counter() - t0
    stats.update(seconds=dt, tokens_per_s=stats["tokens"] / max(dt, 1e-9), vocab_size=tok.vocab_size,
                 dtype=np.dtype(token_dtype(tok.vocab_size)).name)
    log(f"wrote {out}.bin/.idx: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
        f"({stats['dtype']}), {stats['bytes'] / 2**20:.1f} MB of text in {dt:.1f} s "
        f"({stats['tokens_per_s']:,.0f} tokens/s); tokenizer {out}.tokenizer.json")
    return stats
