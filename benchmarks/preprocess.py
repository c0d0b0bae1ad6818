"""End-to-end tokens/s of `llmtrain preprocess` vs. the tokenizer's own ceiling, in one run.

The ceiling is `encode_batch` of the same tokenizer over the same texts already in memory:
tokenization itself, with no reading, document handling or writing. Target: >= 0.8x.

    python benchmarks/preprocess.py [--vocab 4096] [--limit-mb 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from llmtrain.data.preprocess import preprocess, stdlib_files
from llmtrain.data.tokenizer import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--limit-mb", type=float, default=0, help="use only the first N MB of files")
    ap.add_argument("--repeats", type=int, default=3, help="best of N for every row (default 3)")
    args = ap.parse_args()

    files, size = [], 0
    for p in stdlib_files():
        files.append(str(p))
        size += p.stat().st_size
        if args.limit_mb and size > args.limit_mb * 2**20:
            break
    texts = [t for t in (Path(f).read_text(encoding="utf-8", errors="replace") for f in files)
             if t.strip()]
    print(f"corpus: {len(files)} stdlib files, {size / 2**20:.1f} MB")
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer.train_bpe(iter(texts), args.vocab)
        tok.save(f"{tmp}/tok.json")
        # rows alternate and each keeps its best of N, so load from other processes hits all alike
        best: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            n_tokens = 0
            for i in range(0, len(texts), 512):
                n_tokens += sum(map(len, tok.encode_batch(texts[i:i + 512])))
            name = "encode_batch in memory (ceiling)"
            best[name] = max(best.get(name, 0), n_tokens / (time.perf_counter() - t0))
            counts[name] = n_tokens
            for workers in (1, 2):
                stats = preprocess(files, f"{tmp}/out{workers}", f"{tmp}/tok.json",
                                   workers=workers, progress=False, log=lambda *a: None)
                name = f"llmtrain preprocess --workers {workers}"
                best[name] = max(best.get(name, 0), stats["tokens"] / stats["seconds"])
                counts[name] = stats["tokens"]
        ceiling = best["encode_batch in memory (ceiling)"]
        rows = [(name, counts[name], tps, tps / ceiling) for name, tps in best.items()]
    print(f"{'path':<36} {'tokens':>12} {'tokens/s':>12} {'x ceiling':>10}")
    for name, n, tps, ratio in rows:
        print(f"{name:<36} {n:>12,} {tps:>12,.0f} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
