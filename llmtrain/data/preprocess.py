"""Raw text -> tokenizer + megatron-core indexed dataset (`PREFIX.bin` / `PREFIX.idx`).

The on-disk format is megatron-core's own (`IndexedDatasetBuilder`), so corpora preprocessed for
Megatron-LM / GPT-NeoX load unchanged and ours load there. Each document is followed by the EOD
token. Files are written under temporary names and renamed, `.idx` last, so an interrupted run
never leaves a pair that looks complete.

Raw files are read here rather than through `datasets`: a corpus is untrusted input, and a bad
line must be one error naming its file and line (or, with `data.skip_bad_lines`, a counted
skip), which `datasets`' json loader cannot say (it fails with a traceback from deep inside
pyarrow, for the whole group of files). JSON Lines are read line by line with a bounded line
length; parquet through pyarrow, row group by row group, so a bad row is named by file and row.
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

from llmtrain.config import Config, ConfigError, DataConfig
from llmtrain.data.indexed import PAIR_SUFFIXES, check_datasets, check_indexed, check_pairs
from llmtrain.data.mcore import import_datasets
from llmtrain.data.span_corruption import N_SENTINELS, SENTINEL
from llmtrain.data.tokenizer import Tokenizer

_FORMATS = {".txt": "text", ".text": "text", ".py": "text", ".md": "text", ".json": "json",
            ".jsonl": "json", ".parquet": "parquet"}


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


# ----------------------------------------------------------------------------------------------
# Reading jsonl / json / parquet / text files, with bad input named by file and line

MAX_LINE_BYTES = 64 << 20  # one JSON line; a longer one is refused (bounded reads)
MAX_JSON_BYTES = 1 << 30   # a .json file holding one document (an array of records)

# kind of bad input -> (singular, plural) for the end-of-pass warning
_BAD_KINDS = {"malformed": ("malformed line", "malformed lines"),
              "utf8": ("line of non-UTF-8 text", "lines of non-UTF-8 text"),
              "long": ("over-long line", "over-long lines"),
              "type": ("record whose text is null or not a string",
                       "records whose text is null or not a string"),
              "field": ("record without the text field", "records without the text field"),
              "empty": ("empty file", "empty files"),
              "file": ("unreadable JSON file", "unreadable JSON files")}


class BadLines:
    """Bad input met by one pass over the files. Without `skip` the first is a one-line
    ConfigError naming the file and line; with it (`data.skip_bad_lines`, `--skip-bad-lines`)
    it is skipped and counted, for one warning per kind of problem at the end (`warnings()`).
    `hint` tells how to turn skipping on."""

    def __init__(self, skip: bool = False, hint: str = "set data.skip_bad_lines=true"):
        self.skip, self.hint = skip, hint
        self.seen: dict[str, list] = {}  # kind -> [count, first file, first place, files]

    def reset(self) -> None:
        """Every pass over the files meets the same lines: count the latest one only."""
        self.seen = {}

    def __call__(self, kind: str, path: str, place: str, message: str,
                 what: str | None = "line") -> None:
        if not self.skip:
            if what:
                message += f"; fix or remove the {what}, or {self.hint} to skip such {what}s"
            raise ConfigError(message)
        entry = self.seen.setdefault(kind, [0, path, place, set()])
        entry[0] += 1
        entry[3].add(path)

    def warnings(self) -> list[str]:
        out = []
        for kind, (n, path, place, files) in self.seen.items():
            noun = _BAD_KINDS[kind][n != 1]
            if kind == "empty":
                out.append(f"warning: skipped {n} {noun} ({path}{', ...' if n > 1 else ''})")
            elif len(files) == 1:
                out.append(f"warning: skipped {n} {noun} in {path} (first: {place})")
            else:
                out.append(f"warning: skipped {n} {noun} in {len(files)} files (first: {path} "
                           f"{place})")
        return out


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n} bytes"


def _describe(value) -> str:
    """A non-string field value as JSON calls it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (bytes, bytearray)):
        return "binary data"
    return f"a {type(value).__name__}"


def _open(path: str):
    try:
        return open(path, "rb")
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror})") from None


def _format(path: str) -> str:
    fmt = _FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path!r} has an unknown extension; use one of "
                          + ", ".join(sorted(_FORMATS)))
    return fmt


def _parse_line(raw: bytes, n: int, path: str, bad: BadLines) -> dict | None:
    """The JSON object of line `n`, or None after reporting it to `bad`."""
    try:
        text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as e:
        bad("utf8", path, f"line {n}", f"{path} line {n} is not valid UTF-8 (byte "
            f"0x{raw[e.start]:02x} at column {e.start + 1})")
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        bad("malformed", path, f"line {n}", f"{path} line {n} is not valid JSON ({e.msg} at "
            f"column {e.colno})")
        return None
    except RecursionError:
        bad("malformed", path, f"line {n}", f"{path} line {n} is JSON nested too deeply to read")
        return None
    if not isinstance(record, dict):
        bad("malformed", path, f"line {n}", f"{path} line {n} is {_describe(record)}, not a JSON "
            f"object")
        return None
    return record


def _jsonl_records(path: str, bad: BadLines) -> Iterator[tuple[str, dict]]:
    """(place, object) of every line of a JSON Lines file, read line by line (blank lines are
    allowed); a file without any line is bad input too."""
    with _open(path) as f:
        n, content = 0, False
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                content = True
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    pass  # the rest of the over-long line
                bad("long", path, f"line {n}", f"{path} line {n} is longer than the "
                    f"{_size(MAX_LINE_BYTES)} a JSON line may hold")
                continue
            if raw.isspace():
                continue
            content = True
            record = _parse_line(raw, n, path, bad)
            if record is not None:
                yield f"line {n}", record
    if not content:
        bad("empty", path, "", f"{path} is empty; a JSON Lines file holds one JSON object per "
            f"line", what="file")


def _json_document_records(path: str, bad: BadLines) -> Iterator[tuple[str, dict]]:
    """(place, object) of a .json file holding one JSON document: an array of objects, one
    object, or an object of equal-length column arrays (as `datasets` reads it)."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ConfigError(f"{path} is a single JSON document of {_size(size)}; above "
                          f"{_size(MAX_JSON_BYTES)} write JSON Lines instead (.jsonl, one "
                          f"object per line)")
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad("file", path, f"line {line}", f"{path} line {line} is not valid UTF-8 (byte "
            f"0x{data[e.start]:02x})", what="file")
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        bad("file", path, f"line {e.lineno}", f"{path} line {e.lineno} is not valid JSON "
            f"({e.msg} at column {e.colno})", what="file")
        return
    except RecursionError:
        bad("file", path, "", f"{path} is JSON nested too deeply to read", what="file")
        return
    if isinstance(doc, dict):
        cols = list(doc.values())
        if cols and all(isinstance(c, list) for c in cols) and len({len(c) for c in cols}) == 1:
            doc = [dict(zip(doc, row)) for row in zip(*cols)]
        else:
            doc = [doc]
    if not isinstance(doc, list):
        bad("file", path, "", f"{path} holds {_describe(doc)}, not JSON objects", what="file")
        return
    if not doc:
        bad("empty", path, "", f"{path} holds no records", what="file")
    for i, record in enumerate(doc, 1):
        if isinstance(record, dict):
            yield f"item {i}", record
        else:
            bad("malformed", path, f"item {i}", f"{path} item {i} is {_describe(record)}, not a "
                f"JSON object", what="record")


def _json_records(path: str, bad: BadLines) -> Iterator[tuple[str, dict]]:
    """A .jsonl file is JSON Lines; a .json file too, unless it starts with `[` or with a line
    holding only `{` (one document, e.g. pretty-printed)."""
    if Path(path).suffix.lower() == ".json":
        with _open(path) as f:
            head = f.read(1 << 16).lstrip(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"[") or head.split(b"\n", 1)[0].strip() == b"{":
            yield from _json_document_records(path, bad)
            return
    yield from _jsonl_records(path, bad)


def _parquet(path: str, fields: list[tuple[str, str]]):
    """The opened parquet file, after checking that it has every field."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    for key, field in fields:
        if field not in names:
            raise ConfigError(f"{key}={field!r} is not a field of {path} (fields: "
                              f"{', '.join(names)[:200]})")
    return pf


def _parquet_records(path: str, fields: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
    """(place, {field: value}) of every row of a parquet file, in batches (bounded memory).
    Read with pyarrow directly: `datasets` costs ~0.1 s per file and cannot say which file of a
    group a bad row is in."""
    import pyarrow as pa
    pf = _parquet(path, fields)
    names = [f for _, f in fields]
    batches = pf.iter_batches(batch_size=4096, columns=names)
    row = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read the rows after row {row} "
                              f"({_first_line(e)}); the file is damaged") from None
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        for values in zip(*columns):
            row += 1
            yield f"row {row}", dict(zip(names, values))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def _text_document(path: str, bad: BadLines) -> str:
    """A text file as one document, newlines made universal (as text-mode `open`); with skipping,
    its non-UTF-8 lines are dropped."""
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        kept = []
        for n, raw in enumerate(data.split(b"\n"), 1):  # no UTF-8 sequence holds a 0x0a byte
            try:
                kept.append(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad("utf8", path, f"line {n}", f"{path} line {n} is not valid UTF-8 (byte "
                    f"0x{raw[e.start]:02x} at column {e.start + 1})")
        text = "\n".join(kept)
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _field_values(path: str, fmt: str, fields: list[tuple[str, str]],
                  bad: BadLines) -> Iterator[tuple[str, ...]]:
    """The string values of `fields` ((config key, field name) pairs) of every record of a
    json/jsonl/parquet file. A record without them, or whose value is null, a number, ... is
    bad input; a file where no record has them is a ConfigError whatever `bad.skip` says."""
    records = (_parquet_records(path, fields) if fmt == "parquet"
               else _json_records(path, bad))
    names = [f for _, f in fields]
    found = False  # some record has every field
    seen_fields: list[str] | None = None
    for place, record in records:
        missing = next(((k, f) for k, f in fields if f not in record), None)
        if missing is not None:
            seen_fields = seen_fields or [str(k) for k in record]
            key, field = missing
            # before any record had it, a missing field is more likely a misspelt key
            bad("field", path, place, f"{key}={field!r} is not a field of {path} {place} (fields: "
                f"{', '.join(map(str, record))[:200]})", what="record" if found else None)
            continue
        found = True
        values = tuple(record[f] for f in names)
        wrong = next(((k, f, v) for (k, f), v in zip(fields, values) if not isinstance(v, str)),
                     None)
        if wrong is not None:
            key, field, value = wrong
            bad("type", path, place, f"{path} {place}: {key}={field!r} is {_describe(value)}, "
                f"not a string", what="record")
            continue
        if fmt != "parquet" and not all(v.isascii() for v in values):
            try:  # JSON escapes can spell unpaired surrogates, which no tokenizer encodes
                for v in values:
                    v.encode("utf-8")
            except UnicodeEncodeError as e:
                bad("utf8", path, place, f"{path} {place}: the text holds the unpaired surrogate "
                    f"\\u{ord(e.object[e.start]):04x}, which is not valid Unicode")
                continue
        yield values
    if not found and seen_fields is not None:
        key, field = next((k, f) for k, f in fields if f not in seen_fields)
        raise ConfigError(f"{key}={field!r} is not a field of {path} (fields: "
                          f"{', '.join(seen_fields)[:200]})")


def check_inputs(files: list[str], fields: list[tuple[str, str]], bad: BadLines,
                 text_files: bool = True) -> None:
    """What can be checked before a pass over the data: every file has a known extension and
    can be read, JSON files are not empty, parquet files open and have the fields."""
    for path in files:
        fmt = _format(path)
        if fmt == "text" and not text_files:
            raise ConfigError(f"{path!r}: sequence-to-sequence pairs are read from jsonl, json "
                              f"or parquet files (data.source_field/target_field)")
        if fmt == "parquet":
            _parquet(path, fields)
            continue
        with _open(path) as f:
            head = f.read(1 << 16) if fmt == "json" else b""
        if fmt == "json" and not bad.skip and (not head or (head.isspace()
                                                            and len(head) < 1 << 16)):
            bad("empty", path, "", f"{path} is empty; a JSON Lines file holds one JSON object "
                f"per line", what="file")


def iter_file_texts(files: list[str], text_field: str = "text", key: str = "data.text_field",
                    bad: BadLines | None = None) -> Iterator[str]:
    """Documents of `files`, streamed (bounded memory whatever the corpus size): a text file
    (.txt/.md/.py) is one document, a jsonl/json/parquet file one per record. Read here rather
    than through `datasets` so that bad input is named by file and line (see `BadLines`)."""
    bad = bad if bad is not None else BadLines()
    bad.reset()
    formats = [_format(path) for path in files]
    for path, fmt in zip(files, formats):
        if fmt == "text":
            text = _text_document(path, bad)
            if text.strip():
                yield text
            continue
        for (text,) in _field_values(path, fmt, [(key, text_field)], bad):
            if text.strip():
                yield text


def iter_file_pairs(files: list[str], source_field: str, target_field: str,
                    bad: BadLines | None = None) -> Iterator[tuple[str, str]]:
    """(source, target) of every jsonl/json/parquet record, streamed; a record whose source or
    target is empty is skipped, one with bad input reported to `bad` (the same records on every
    pass, so the two sides stay aligned)."""
    bad = bad if bad is not None else BadLines()
    bad.reset()
    fields = [("data.source_field", source_field), ("data.target_field", target_field)]
    for path in files:
        if _format(path) == "text":
            raise ConfigError(f"{path!r}: sequence-to-sequence pairs are read from jsonl, json "
                              f"or parquet files (data.source_field/target_field)")
    for path in files:
        for src, tgt in _field_values(path, _format(path), fields, bad):
            if src.strip() and tgt.strip():
                yield src, tgt


# ----------------------------------------------------------------------------------------------
# Writing an indexed dataset


def write_indexed(docs: Iterable[list[int]], prefix: str | Path, vocab_size: int) -> dict:
    """Write token lists (one per document, EOD already appended) as megatron-core .bin/.idx."""
    import_datasets()
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
    if d.skip_bad_lines:  # a corpus that skipped lines must not serve a run that forbids them
        ident["skip_bad_lines"] = True
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def prepare_corpus(cfg: Config, log=print) -> tuple[str, Tokenizer]:
    """Return (indexed-dataset prefix, tokenizer) for `cfg.data`, building them on first use.

    source=stdlib|files: tokenizer trained (or loaded from data.tokenizer) and the corpus written
    under the cache dir, keyed by a hash of everything that determines it.
    source=indexed: data.paths[0] is an existing prefix; data.tokenizer must name its tokenizer
    (or a tokenizer.json must lie next to the prefix).
    Every indexed dataset the run will open (data.paths[0], data.blend, the cached corpus) is
    checked here (`indexed.check_indexed`), and every raw file read, so that bad data is a
    ConfigError before the first step; bad lines skipped under data.skip_bad_lines are logged as
    one counted warning per kind (again whenever the cached corpus is reused).
    """
    d = cfg.data
    check_datasets(cfg)  # data.blend, first: before building a corpus that the blend replaces
    if d.source == "indexed":
        return _indexed_corpus(d)

    files = [] if d.source == "stdlib" else expand_paths(d.paths)
    out = cache_root(cfg) / f"corpus-{d.source}-{_corpus_key(cfg, files)}"
    prefix = out / "data"
    tok_file = out / "tokenizer.json"
    notes = out / "warnings.txt"  # what building it skipped, logged again on every reuse
    cached = _cached_corpus(d, out, prefix, tok_file, notes, log)
    if cached is not None:
        return cached

    bad = BadLines(d.skip_bad_lines, "set data.skip_bad_lines=true")
    if d.source_field:
        fields = [("data.source_field", d.source_field), ("data.target_field", d.target_field)]
    else:
        fields = [("data.text_field", d.text_field)]
    check_inputs(files, fields, bad, text_files=not d.source_field)
    out.mkdir(parents=True, exist_ok=True)
    notes.unlink(missing_ok=True)
    try:
        tok = _corpus_tokenizer(cfg, _corpus_texts(d, files, bad), out, log)
        summary = _write_corpus(d, files, bad, tok, prefix, log)
    finally:
        warnings = bad.warnings()
        for line in warnings:
            log(line)
    if warnings:
        notes.write_text("".join(line + "\n" for line in warnings))
    tok.save(tok_file)  # last: its presence marks the cache entry complete
    log(f"corpus ready: {summary}")
    return str(prefix), tok


def _indexed_corpus(d: DataConfig) -> tuple[str, Tokenizer]:
    """source=indexed: data.paths[0], checked, and the tokenizer named or found next to it."""
    prefix = d.paths[0]
    check_indexed(prefix, f"data.paths[0]={prefix}")
    tok_path = d.tokenizer or next(
        (p for p in (f"{prefix}.tokenizer.json", str(Path(prefix).parent / "tokenizer.json"))
         if os.path.isfile(p)), f"{prefix}.tokenizer.json")
    return prefix, Tokenizer.load(tok_path)


def _cached_corpus(d: DataConfig, out: Path, prefix: Path, tok_file: Path, notes: Path,
                   log) -> tuple[str, Tokenizer] | None:
    """The cache entry in `out` if complete and sound (logging again what its build skipped);
    None to build it, after dropping a damaged entry's tokenizer."""
    last = f"{prefix}{PAIR_SUFFIXES[1]}.idx" if d.source_field else f"{prefix}.idx"
    if not (tok_file.is_file() and Path(last).is_file()):
        return None
    try:
        if d.source_field:
            check_pairs(str(prefix))
        else:
            check_indexed(str(prefix))
        if notes.is_file():
            for line in notes.read_text().splitlines():
                log(line)
        return str(prefix), Tokenizer.load(tok_file)
    except ConfigError as e:
        log(f"warning: the cached corpus in {out} is damaged ({e}); building it again")
        tok_file.unlink(missing_ok=True)
    return None


def _corpus_texts(d: DataConfig, files: list[str], bad: BadLines) -> Iterator[str]:
    if d.source == "stdlib":
        yield from iter_stdlib_texts()
    elif d.source_field:  # sequence-to-sequence pairs: both sides train the tokenizer
        for pair in iter_file_pairs(files, d.source_field, d.target_field, bad):
            yield from pair
    else:
        yield from iter_file_texts(files, d.text_field, bad=bad)


def _corpus_tokenizer(cfg: Config, texts: Iterator[str], out: Path, log) -> Tokenizer:
    """data.tokenizer, else a byte-level BPE trained on `texts`."""
    d = cfg.data
    if d.tokenizer:
        return Tokenizer.load(d.tokenizer)
    log(f"training a {cfg.model.vocab_size}-entry byte-level BPE tokenizer on the "
        f"{d.source} corpus (once; cached in {out})")
    # encoder-decoder models train by span corruption: T5's 100 sentinels join the
    # vocabulary
    extra = ([SENTINEL.format(i) for i in range(N_SENTINELS)]
             if cfg.model.arch == "encoder_decoder" else [])
    return Tokenizer.train_bpe(texts, cfg.model.vocab_size, extra_special=extra)


def _write_corpus(d: DataConfig, files: list[str], bad: BadLines, tok: Tokenizer, prefix: Path,
                  log) -> str:
    """Tokenize the corpus into the indexed dataset(s) at `prefix`; a one-line summary."""
    if d.source_field:
        # two aligned indexed datasets, document i of each = the two sides of pair i
        log(f"tokenizing the {d.source_field} -> {d.target_field} pairs into {prefix}"
            f"{{{PAIR_SUFFIXES[0]},{PAIR_SUFFIXES[1]}}}.bin/.idx")
        for side, suffix in enumerate(PAIR_SUFFIXES):
            pairs = iter_file_pairs(files, d.source_field, d.target_field, bad)
            stats = write_indexed(encode_documents((pair[side] for pair in pairs), tok),
                                  f"{prefix}{suffix}", tok.vocab_size)
        return f"{stats['documents']} pairs; {stats['tokens']:,} target tokens"
    log(f"tokenizing the {d.source} corpus into {prefix}.bin/.idx")
    stats = write_indexed(encode_documents(_corpus_texts(d, files, bad), tok), prefix,
                          tok.vocab_size)
    return f"{stats['documents']} documents, {stats['tokens']:,} tokens"


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
    import_datasets()


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
               progress: bool = True, log=print, skip_bad_lines: bool = False) -> dict:
    """Stream `inputs` (`iter_file_texts`), tokenize with `workers` processes, write
    OUTPUT.bin/.idx and OUTPUT.tokenizer.json. Returns counts and rates. A malformed line, non-UTF-8
    text or a text field that is not a string stops with a ConfigError naming the file and line,
    or with `skip_bad_lines` is skipped and counted in one warning per kind at the end."""
    import threading

    # megatron-core's dataset import takes a second; overlap it with reading and tokenizing.
    threading.Thread(target=_import_writer, daemon=True).start()
    files = expand_paths(inputs, key="--input")
    bad = BadLines(skip_bad_lines, "pass --skip-bad-lines")
    check_inputs(files, [("--text-field", text_field)], bad)
    texts = lambda: iter_file_texts(files, text_field, key="--text-field", bad=bad)  # noqa: E731
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _preprocess(texts, out, tokenizer, workers, append_eod, batch_docs, progress, log)
    finally:
        for line in bad.warnings():
            log(line)


def _preprocess(texts, out: Path, tokenizer: str, workers: int, append_eod: bool,
                batch_docs: int, progress: bool, log) -> dict:
    import multiprocessing as mp
    import time

    from llmtrain.data import _tokenize_worker

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
