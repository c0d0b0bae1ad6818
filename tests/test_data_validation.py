"""Bad input data is a one-line error (exit 2) before training starts, never a traceback or a
failure at step N: damaged megatron-core .bin/.idx datasets are caught when opened, malformed
jsonl / non-UTF-8 text / non-string text fields are named by file and line, or skipped and
counted with data.skip_bad_lines (preprocess: skip_bad_lines=True)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import set_args, tiny_overrides
from llmtrain.cli import main
from llmtrain.config import ConfigError, load_config
from llmtrain.data import preprocess as pp
from llmtrain.data.loader import (build_datasets, build_pair_datasets, check_indexed,
                                  check_vocab)
from llmtrain.data.preprocess import (BadLines, iter_file_pairs, iter_file_texts, prepare_corpus,
                                      preprocess, write_indexed)
from llmtrain.data.tokenizer import Tokenizer

QUIET = {"progress": False, "log": lambda *a: None}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def doc(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(12 + i % 7))


def write_lines(path: Path, lines: list) -> Path:
    """Lines given as str (a newline is added) or as raw bytes (written as they are)."""
    with path.open("wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (line + "\n").encode())
    return path


def good_lines(n: int, start: int = 0, field: str = "text") -> list[str]:
    return [json.dumps({field: doc(i)}) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.train_bpe((doc(i) for i in range(200)), 300)
    tok.save(d / "tokenizer.json")
    return d / "tokenizer.json"


def read_all(files, skip=False, field="text"):
    bad = BadLines(skip)
    return list(iter_file_texts([str(f) for f in files], field, bad=bad)), bad.warnings()


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


# ----------------------------------------------------------------------------------------------
# Indexed datasets (.bin/.idx)

N_DOCS = 20


@pytest.fixture
def indexed(tmp_path):
    """A factory: a fresh copy of one valid dataset under a new prefix (the check caches per
    file, so every variant gets its own files)."""
    src = tmp_path / "orig"
    write_indexed([[1 + i % 7, 2, 3, 0] if i % 2 else [4, 5, 0] for i in range(N_DOCS)], src, 512)

    def make(name: str) -> str:
        for ext in (".bin", ".idx"):
            shutil.copy(f"{src}{ext}", tmp_path / f"{name}{ext}")
        return str(tmp_path / name)
    return make


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


HEAD = 34  # magic 9 + version 8 + dtype code 1 + sequence count 8 + boundary count 8
CORRUPTIONS = {
    "bin truncated": (lambda p: _truncate(p + ".bin", 50),
                      r"\.bin holds 50 bytes but .*\.idx describes 140; the dataset is truncated "
                      r"or its index belongs to another file"),
    "bin empty": (lambda p: _truncate(p + ".bin", 0), r"\.bin holds 0 bytes but"),
    "bin too long": (lambda p: open(p + ".bin", "ab").write(b"\0" * 10),
                     r"holds 150 bytes but .* describes 140; its index belongs to another file"),
    "idx empty": (lambda p: _truncate(p + ".idx", 0), r"\.idx holds 0 bytes, less than the "
                                                      r"34-byte header .* it is empty"),
    "idx header cut": (lambda p: _truncate(p + ".idx", 20), r"holds 20 bytes, less than"),
    "idx truncated": (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 8),
                      r"header counts 20 sequences and 21 document boundaries \(442 bytes\); the "
                      r"index is truncated"),
    "idx garbage": (lambda p: open(p + ".idx", "wb").write(bytes(range(256)) * 2),
                    r"is not a megatron-core index"),
    "version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 7)), r"index version 7"),
    "dtype code": (lambda p: _patch(p + ".idx", 17, bytes([42])), r"token dtype code 42"),
    "absurd count": (lambda p: _patch(p + ".idx", 18, struct.pack("<Q", 1 << 62)),
                     r"header counts 4611686018427387904 sequences"),
    "pointer beyond": (lambda p: _patch(p + ".idx", HEAD + 4 * N_DOCS + 8 * 5,
                                        struct.pack("<q", 10**9)),
                       r"places sequence 5 .* at byte 1000000000, beyond the 140 bytes"),
    "pointer negative": (lambda p: _patch(p + ".idx", HEAD + 4 * N_DOCS + 8 * 2,
                                          struct.pack("<q", -8)), r"sequence 2 .* at byte -8"),
    "negative length": (lambda p: _patch(p + ".idx", HEAD + 4 * 3, struct.pack("<i", -5)),
                        r"gives sequence 3 the length -5"),
    "boundaries": (lambda p: _patch(p + ".idx", HEAD + 12 * N_DOCS + 8 * 3,
                                    struct.pack("<q", 99)),
                   r"document boundary 4 \(4\) is below the one before it \(99\)"),
    "last boundary": (lambda p: _patch(p + ".idx", HEAD + 12 * N_DOCS + 8 * N_DOCS,
                                       struct.pack("<q", 5)),
                      r"document boundaries run from 0 to 5, not from 0 to its 20 sequences"),
}


def test_a_valid_dataset_passes(indexed):
    info = check_indexed(indexed("ok"))
    assert (info.sequences, info.documents, info.tokens) == (N_DOCS, N_DOCS, 70)
    assert info.dtype == np.uint16


def test_a_split_left_without_documents_is_refused(indexed):
    """megatron-core cuts the splits at the rounded fractions of the sequence count and loops
    forever building an empty split the run samples from (it happened with 9 documents at
    98,2,0); the run is refused in one line instead. 20 documents at 98,2,0: validation gets
    round(1.0 x 20) - round(0.98 x 20) = 0 of them."""
    from llmtrain.data.loader import check_split_has_sequences
    prefix = indexed("split")
    with pytest.raises(ConfigError) as e:
        check_split_has_sequences(prefix, "98,2,0", [8, 4, 0])
    assert str(e.value).startswith("data.split='98,2,0' gives the validation split none of "
                                   "the 20 documents")
    check_split_has_sequences(prefix, "90,10,0", [8, 4, 0])  # 2 documents: enough
    check_split_has_sequences(prefix, "98,2,0", [8, 0, 0])  # no validation samples asked for
    with pytest.raises(ConfigError, match="training split none"):
        check_split_has_sequences(prefix, "1,99,0", [8, 4, 0])


def test_pair_splits_are_cut_as_megatron_cuts_documents(indexed, tmp_path, tok_file):
    """The sequence-to-sequence pairs (data.source_field/target_field) are split by the cut of
    the decoder path: a split without a pair and a data.split that megatron-core misreads
    (a minus sign dropped, a fourth share, a zero sum) are refused in one line, not met as a
    ZeroDivisionError or a traceback at the first batch."""
    from llmtrain.data.indexed import PAIR_SUFFIXES
    for suffix in PAIR_SUFFIXES:
        indexed("p" + suffix)  # 20 pairs
    prefix, tok = str(tmp_path / "p"), Tokenizer.load(tok_file)
    jsonl = write_lines(tmp_path / "p.jsonl", ['{"q": "a", "a": "b"}'])
    over = _overrides(tmp_path, **{
        "model.arch": "encoder_decoder", "model.n_encoder_layers": 1, "model.n_decoder_layers": 1,
        "model.position": "t5_relative", "data.source": "files", "data.paths": f"[{jsonl}]",
        "data.source_field": "q", "data.target_field": "a"})

    def pairs(split: str):
        return build_pair_datasets(load_config(None, over + [f"data.split={split}"]), prefix, tok)

    # the cumulative shares 2.5, 19, 20 of 20: rounding each share alone (2, 16, 1) left pair 18
    # in no split
    train, valid = pairs("2.5,16.5,1")
    assert sorted(train.docs.tolist()) == [0, 1] and valid.docs.tolist() == list(range(2, 19))
    with pytest.raises(ConfigError) as e:
        pairs("98,2,0")
    assert str(e.value) == (f"data.split='98,2,0' gives the validation split none of the 20 pairs "
                            f"of {prefix}; use a larger corpus or give that split a larger share "
                            f"(each split needs at least one pair)")
    with pytest.raises(ConfigError, match="the training split none of the 20 pairs"):
        pairs("1,99,0")
    for bad in ("0,0,0", "-50,150,0", "90,10,0,5", "abc"):
        with pytest.raises(ConfigError, match=f"data.split='{bad}' is not 1 to 3 non-negative "
                                              f"shares"):
            pairs(bad)
    cfg = load_config(None, _overrides(tmp_path, **{"data.source": "indexed",
                                                     "data.paths": f"[{prefix}{PAIR_SUFFIXES[0]}]"}))
    cfg.data.split = "90,10,0,5"  # as if the config check had been skipped
    with pytest.raises(ConfigError, match="is not 1 to 3"):  # the decoder path: the same parse
        build_datasets(cfg, prefix + PAIR_SUFFIXES[0], tok)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_damaged_indexed_dataset_is_named_when_opened(indexed, name):
    damage, message = CORRUPTIONS[name]
    prefix = indexed(name.replace(" ", "_"))
    damage(prefix)
    with pytest.raises(ConfigError, match=message) as e:
        check_indexed(prefix, f"data.paths[0]={prefix}")
    assert str(e.value).startswith(f"data.paths[0]={prefix}: ") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=message):  # the vocabulary scan checks first
        check_vocab(prefix, 512)


def test_missing_half_of_a_pair(indexed):
    prefix = indexed("half")
    os.remove(prefix + ".bin")
    with pytest.raises(ConfigError, match=r"half\.bin does not exist"):
        check_indexed(prefix)


def _overrides(tmp_path, **extra) -> list[str]:
    return tiny_overrides(tmp_path / "run", **{"model.vocab_size": 512, **extra})


def test_training_on_a_truncated_dataset_stops_before_step_0(indexed, tmp_path, capsys,
                                                              tok_file):
    prefix = indexed("trunc")
    shutil.copy(tok_file, prefix + ".tokenizer.json")
    _truncate(prefix + ".bin", 100)
    err = one_line_error(capsys, ["train", *set_args(_overrides(tmp_path, **{
        "data.source": "indexed", "data.paths": f"[{prefix}]"}))])
    assert f"data.paths[0]={prefix}: {prefix}.bin holds 100 bytes but {prefix}.idx describes " \
           f"140" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_damaged_blend_member_is_named(indexed, tmp_path, capsys, tok_file):
    good, broken = indexed("good"), indexed("broken")
    shutil.copy(tok_file, good + ".tokenizer.json")
    _patch(broken + ".idx", 0, b"NOTANIDX!")
    blend = f"[[0.5, {good}], [0.5, {broken}]]"
    err = one_line_error(capsys, ["train", *set_args(_overrides(tmp_path, **{
        "data.source": "indexed", "data.paths": f"[{good}]", "data.blend": blend}))])
    assert f"data.blend[1]={broken}: {broken}.idx is not a megatron-core index" in err


def test_negative_token_ids_are_caught_at_load(tmp_path):
    write_indexed([[5, -3, 0]], tmp_path / "neg", 70000)  # int32 tokens
    with pytest.raises(ConfigError, match="token id -3 < 0"):
        check_vocab(str(tmp_path / "neg"), 70000)


def test_a_damaged_corpus_cache_is_rebuilt(tmp_path):
    write_lines(tmp_path / "a.jsonl", good_lines(60))
    cfg = load_config(None, _overrides(tmp_path, **{
        "data.source": "files", "data.paths": f"[{tmp_path}/a.jsonl]",
        "data.cache_dir": str(tmp_path / "cache")}))
    prefix, _ = prepare_corpus(cfg, log=lambda *a: None)
    size = os.path.getsize(prefix + ".bin")
    _truncate(prefix + ".bin", 10)
    said = []
    prefix2, tok = prepare_corpus(cfg, log=said.append)
    assert prefix2 == prefix and os.path.getsize(prefix + ".bin") == size
    assert any("is damaged" in s and "building it again" in s for s in said)
    build_datasets(cfg, prefix, tok)


# ----------------------------------------------------------------------------------------------
# Raw files: jsonl / json / text / parquet

BAD_JSONL = {
    "malformed": ('{"text": "x",}', r"line 3 is not valid JSON \(Expecting property name"),
    "not an object": ("[1, 2]", r"line 3 is an array, not a JSON object"),
    "non-utf8": (b'{"text": "caf\xe9"}\n', r"line 3 is not valid UTF-8 \(byte 0xe9 at column 14\)"),
    "null text": ('{"text": null}', r"line 3: data.text_field='text' is null, not a string"),
    "number text": ('{"text": 42}', r"line 3: data.text_field='text' is a number \(42\), not a "
                                    r"string"),
    "surrogate": ('{"text": "a\\ud800b"}', r"line 3: the text holds the unpaired surrogate "
                                           r"\\ud800"),
    "missing field": ('{"body": "x"}', r"data.text_field='text' is not a field of .* line 3 "
                                       r"\(fields: body\)"),
    "nested too deeply": ("[" * 100_000, r"line 3 is JSON nested too deeply"),
}


@pytest.mark.parametrize("name", list(BAD_JSONL))
def test_bad_jsonl_line_is_named_or_skipped_and_counted(tmp_path, name):
    line, message = BAD_JSONL[name]
    path = write_lines(tmp_path / "a.jsonl", good_lines(2) + [line] + good_lines(3, 2) + [line])
    with pytest.raises(ConfigError, match=message) as e:
        read_all([path])
    err = str(e.value)
    assert err.startswith(str(path) if name != "missing field" else "data.text_field")
    assert "\n" not in err and "set data.skip_bad_lines=true" in err
    texts, warnings = read_all([path], skip=True)
    assert texts == [doc(i) for i in range(5)]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 2 ")
    assert warnings[0].endswith(f" in {path} (first: line 3)")


def test_the_warning_example_reads_as_documented(tmp_path):
    bad = '{"text": '
    path = write_lines(tmp_path / "a.jsonl", good_lines(6) + [bad] + good_lines(2) + [bad, bad])
    texts, warnings = read_all([path], skip=True)
    assert len(texts) == 8
    assert warnings == [f"warning: skipped 3 malformed lines in {path} (first: line 7)"]


def test_warnings_count_one_pass_and_summarise_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", good_lines(2) + ["{", '{"text": null}'])
    b = write_lines(tmp_path / "b.jsonl", ["nope"] + good_lines(1))
    bad = BadLines(skip=True)
    for _ in range(2):  # the tokenizer pass and the tokenizing pass read the same lines
        assert len(list(iter_file_texts([str(a), str(b)], bad=bad))) == 3
    assert bad.warnings() == [
        f"warning: skipped 2 malformed lines in 2 files (first: {a} line 3)",
        f"warning: skipped 1 record whose text is null or not a string in {a} (first: line 4)"]


def test_empty_jsonl_file(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    ok = write_lines(tmp_path / "ok.jsonl", good_lines(2))
    for path in (empty, blank):
        with pytest.raises(ConfigError, match=f"{path} is empty; a JSON Lines file holds one JSON "
                                              f"object per line; fix or remove the file"):
            read_all([ok, path])
    texts, warnings = read_all([empty, ok, blank], skip=True)
    assert len(texts) == 2 and warnings == [f"warning: skipped 2 empty files ({empty}, ...)"]


def test_overlong_line_is_refused_with_bounded_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "MAX_LINE_BYTES", 100)
    long = json.dumps({"text": "x" * 500})
    path = write_lines(tmp_path / "a.jsonl", good_lines(1) + [long] + good_lines(1, 1))
    with pytest.raises(ConfigError, match=r"line 2 is longer than the 100 bytes a JSON line may "
                                          r"hold"):
        read_all([path])
    texts, warnings = read_all([path], skip=True)
    assert texts == [doc(0), doc(1)], "the rest of the long line is not read as lines"
    assert warnings == [f"warning: skipped 1 over-long line in {path} (first: line 2)"]


def test_json_files_as_datasets_reads_them(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "one"}, {"text": "two"}], indent=2))
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"text": "pretty"}, indent=2))
    cols = tmp_path / "cols.json"
    cols.write_text("{\n" + '"text": ["c1", "c2"], "id": [1, 2]\n}')
    lines = write_lines(tmp_path / "lines.json", good_lines(2))
    bom = write_lines(tmp_path / "bom.jsonl", [b'\xef\xbb\xbf{"text": "bom"}\n'])
    texts, warnings = read_all([arr, obj, cols, lines, bom])
    assert texts == ["one", "two", "pretty", "c1", "c2", doc(0), doc(1), "bom"] and not warnings
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "a"},\n{"text": }]')
    with pytest.raises(ConfigError, match=r"broken.json line 2 is not valid JSON"):
        read_all([broken])


def test_text_files_name_the_non_utf8_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello\r\nworld \xff\xfe\nend\n")
    with pytest.raises(ConfigError, match=r"a.txt line 2 is not valid UTF-8 \(byte 0xff at "
                                          r"column 7\)"):
        read_all([path])
    texts, warnings = read_all([path], skip=True)
    assert texts == ["hello\nend\n"], "the bad line dropped, newlines universal"
    assert warnings == [f"warning: skipped 1 line of non-UTF-8 text in {path} (first: line 2)"]
    (tmp_path / "b.txt").write_bytes(b"line one\r\nline two\r")
    assert read_all([tmp_path / "b.txt"])[0] == ["line one\nline two\n"]


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["a b", None, "c d"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    with pytest.raises(ConfigError, match=r"a.parquet row 2: data.text_field='text' is null"):
        read_all([tmp_path / "a.parquet"])
    texts, warnings = read_all([tmp_path / "a.parquet"], skip=True)
    assert texts == ["a b", "c d"] and "(first: row 2)" in warnings[0]
    with pytest.raises(ConfigError, match=r"data.text_field='body' is not a field of .*a.parquet "
                                          r"\(fields: text, n\)"):
        read_all([tmp_path / "a.parquet"], field="body")
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    with pytest.raises(ConfigError, match=r"junk.parquet is not a readable parquet file"):
        read_all([tmp_path / "junk.parquet"])


def test_pairs_skip_the_same_records_on_both_sides(tmp_path):
    rows = [json.dumps({"q": doc(i), "a": doc(i + 1)}) for i in range(4)]
    rows.insert(2, json.dumps({"q": "orphan", "a": None}))
    path = write_lines(tmp_path / "p.jsonl", rows)
    with pytest.raises(ConfigError, match=r"p.jsonl line 3: data.target_field='a' is null"):
        list(iter_file_pairs([str(path)], "q", "a"))
    pairs = list(iter_file_pairs([str(path)], "q", "a", BadLines(skip=True)))
    assert pairs == [(doc(i), doc(i + 1)) for i in range(4)]


# ----------------------------------------------------------------------------------------------
# Through `llmtrain preprocess` and training (data.source=files)


def test_preprocess_names_the_bad_line_with_and_without_workers(tmp_path, capsys, tok_file):
    path = write_lines(tmp_path / "a.jsonl", good_lines(700) + ['{"text": 3.5}'] + good_lines(5))
    for workers in ("1", "2"):  # with workers the reading thread feeds the pool: same error
        err = one_line_error(capsys, ["preprocess", "--input", str(path), "--output",
                                      str(tmp_path / f"out{workers}"), "--tokenizer",
                                      str(tok_file), "--workers", workers, "--quiet"])
        assert f"{path} line 701: --text-field='text' is a number (3.5), not a string" in err
        assert "pass --skip-bad-lines" in err
        assert not list(tmp_path.glob("out*")), "nothing half-written"


def test_preprocess_empty_file_and_bad_utf8_are_one_line(tmp_path, capsys, tok_file):
    empty = write_lines(tmp_path / "empty.jsonl", [])
    err = one_line_error(capsys, ["preprocess", "--input", str(empty), "--output",
                                  str(tmp_path / "out"), "--tokenizer", "train:300", "--quiet"])
    assert f"{empty} is empty" in err
    bad = write_lines(tmp_path / "b.jsonl", good_lines(3) + [b'{"text": "\xff"}\n'])
    err = one_line_error(capsys, ["preprocess", "--input", str(bad), "--output",
                                  str(tmp_path / "out"), "--tokenizer", "train:300", "--quiet"])
    assert f"{bad} line 4 is not valid UTF-8" in err


def test_preprocess_skip_bad_lines_matches_a_clean_corpus(tmp_path, tok_file):
    clean = write_lines(tmp_path / "clean.jsonl", good_lines(600))
    dirty = write_lines(tmp_path / "dirty.jsonl", good_lines(300) + ["{oops", '{"text": null}',
                                                                     b"\xff\xfe\n"]
                        + good_lines(300, 300) + ['{"text": 1}'])
    empty = write_lines(tmp_path / "empty.jsonl", [])
    ref = preprocess([str(clean)], str(tmp_path / "ref"), str(tok_file), **QUIET)
    said = []
    for workers in (1, 2):
        stats = preprocess([str(dirty), str(empty)], str(tmp_path / f"w{workers}"), str(tok_file),
                           workers=workers, progress=False, log=said.append,
                           skip_bad_lines=True)
        assert stats["documents"] == ref["documents"] == 600
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"w{workers}{ext}").read_bytes() == \
                (tmp_path / f"ref{ext}").read_bytes()
        check_indexed(str(tmp_path / f"w{workers}"))
    warnings = [s for s in said if s.startswith("warning:")]
    assert warnings[:4] == [
        f"warning: skipped 1 malformed line in {dirty} (first: line 301)",
        f"warning: skipped 2 records whose text is null or not a string in {dirty} "
        f"(first: line 302)",
        f"warning: skipped 1 line of non-UTF-8 text in {dirty} (first: line 303)",
        f"warning: skipped 1 empty file ({empty})"]
    assert len(warnings) == 8, "one set per run, after the last pass"


def test_training_on_bad_files_stops_before_step_0(tmp_path, capsys):
    path = write_lines(tmp_path / "a.jsonl", good_lines(50) + ['{"text": null}'] + good_lines(9))
    files = {"data.source": "files", "data.paths": f"[{path}]",
             "data.cache_dir": str(tmp_path / "cache")}
    err = one_line_error(capsys, ["train", *set_args(_overrides(tmp_path, **files))])
    assert f"{path} line 51: data.text_field='text' is null, not a string" in err
    assert "set data.skip_bad_lines=true" in err
    cfg = load_config(None, _overrides(tmp_path, **files, **{"data.skip_bad_lines": True}))
    said = []
    prefix, tok = prepare_corpus(cfg, log=said.append)
    warning = (f"warning: skipped 1 record whose text is null or not a string in {path} "
               f"(first: line 51)")
    assert warning in said
    assert check_indexed(prefix).documents == 59
    build_datasets(cfg, prefix, tok)
    said.clear()
    prepare_corpus(cfg, log=said.append)
    assert said == [warning], "a reused corpus repeats what building it skipped"


def test_pair_corpus_with_a_null_target(tmp_path):
    rows = [json.dumps({"q": doc(i), "a": doc(i + 3)}) for i in range(80)]
    rows[10] = json.dumps({"q": doc(10), "a": None})
    path = write_lines(tmp_path / "p.jsonl", rows)
    over = tiny_overrides(tmp_path / "run", **{
        "model.arch": "encoder_decoder", "model.n_encoder_layers": 1, "model.n_decoder_layers": 1,
        "model.position": "t5_relative", "data.source": "files", "data.paths": f"[{path}]",
        "data.source_field": "q", "data.target_field": "a", "data.split": "90,10,0",
        "data.cache_dir": str(tmp_path / "cache"), "model.vocab_size": 512})
    with pytest.raises(ConfigError, match=r"p.jsonl line 11: data.target_field='a' is null"):
        prepare_corpus(load_config(None, over), log=lambda *a: None)
    cfg = load_config(None, over + ["data.skip_bad_lines=true"])
    prefix, tok = prepare_corpus(cfg, log=lambda *a: None)
    train, valid = build_pair_datasets(cfg, prefix, tok)
    assert len(train) + len(valid) == 79


def test_span_corruption_sentinels_are_checked_before_the_first_batch(tmp_path):
    from llmtrain.data.loader import N_SENTINELS, SENTINEL, SpanCorruptionReader
    tok = Tokenizer.train_bpe((doc(i) for i in range(50)), 400,
                              extra_special=[SENTINEL.format(i) for i in range(N_SENTINELS)])
    over = tiny_overrides(tmp_path / "run", **{
        "model.arch": "encoder_decoder", "model.n_encoder_layers": 1, "model.n_decoder_layers": 1,
        "model.position": "t5_relative", "model.vocab_size": 512, "model.max_seq_len": 4096})
    for seq_len in (2000, 2048):
        cfg = load_config(None, over + [f"train.seq_len={seq_len}"])
        if seq_len == 2000:
            SpanCorruptionReader([0] * 8, cfg, tok)
            continue
        with pytest.raises(ConfigError, match=r"train.seq_len=2048 gives span corruption 102 "
                                              r"noise spans per sample but there are 100 "
                                              r"sentinel tokens; use train.seq_len <= 2008"):
            SpanCorruptionReader([0] * 8, cfg, tok)


def test_preprocess_cli_skip_bad_lines_flag(tmp_path, capsys, tok_file):
    from llmtrain.cli import main
    dirty = write_lines(tmp_path / "dirty.jsonl", good_lines(50) + ["{oops"] + good_lines(50, 50))
    args = ["preprocess", "--input", str(dirty), "--output", str(tmp_path / "out"),
            "--tokenizer", str(tok_file), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{dirty}" in err[0] and "line 51" in err[0], err
    assert main([*args, "--skip-bad-lines"]) == 0
    assert f"warning: skipped 1 malformed line in {dirty} (first: line 51)" in \
        capsys.readouterr().out
    check_indexed(str(tmp_path / "out"))
