"""The CPU training step of configs/tiny.yaml's shape, one change of the fast path at a time,
against the same-shape Hugging Face LlamaForCausalLM eager and compiled, in one process.

    python benchmarks/cpu_step.py [--rounds 8] [--steps 3] [--set KEY=VALUE ...] [--batch B]

Each row is the real training step (`llmtrain bench`'s `make_step`: forward, loss, backward,
global-norm clip, AdamW, the one host sync) and differs from the row above it by one change:

    eager, plain loss                 the step with no fast path (the baseline)
    + compiled blocks                 torch.compile per transformer block, the loss eager
    + compiled loss                   the loss compiled too (= parallel.compile: true)
    eager, fused loss                 train.loss: fused (the output layer and the cross entropy
                                      fused, gradients in the forward), nothing compiled
    compiled, fused loss              parallel.compile: true and train.loss: fused
    compiled, chunked loss            the same with train.loss: chunked (recomputes the logits)
    hf eager / hf compiled            transformers' model, its own loss in its forward
                                      (torch.compile of the whole model in the compiled row)

Why interleaved: on a shared 2-core VM single runs move by 10-25% from one minute to the next
(docs/performance.md), so every row lives in the process at once and the timed steps go round
robin, `--steps` steps of each row per round, `--rounds` rounds: a slow minute hits every row
alike. The first step of each row is timed apart (its excess over the median is the compile
time) and `--warmup` more run untimed before the rounds. Medians are the figures to quote; the
fastest step is the uncontended speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from llmtrain.bench import check_llama_layout, hf_ce_sum, hf_llama, make_step, pure_bf16
from llmtrain.config import Config, load_config
from llmtrain.model import build_model
from llmtrain.parallel.compile import apply_compile, graphs_compiled

BASELINE, HF_COMPILED = "eager, plain loss", "hf compiled"


def with_(cfg: Config, compile: bool, loss: str) -> Config:
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, compile=compile),
                               train=dataclasses.replace(cfg.train, loss=loss))


def ours(cfg: Config, device: torch.device, blocks: bool, loss_compiled: bool,
         loss: str) -> Callable[[torch.Tensor], None]:
    """Our step with the blocks compiled or not, and the loss compiled or not (the plain loss's
    `compiled_loss` follows parallel.compile in the step's config, so blocks compiled by hand
    under a config without it keep the loss eager)."""
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    if blocks:
        apply_compile(model, with_(cfg, True, loss), log=None)
    return make_step(pure_bf16(model, cfg), with_(cfg, loss_compiled, loss), device)


def hf(cfg: Config, device: torch.device, compiled: bool) -> Callable[[torch.Tensor], None]:
    model = pure_bf16(hf_llama(cfg).to(device), cfg)
    run = torch.compile(model) if compiled else model
    return make_step(model, cfg, device, hf_ce_sum(run, device))


ROWS: dict[str, Callable[[Config, torch.device], Callable[[torch.Tensor], None]]] = {
    BASELINE: lambda c, d: ours(c, d, False, False, "plain"),
    "+ compiled blocks": lambda c, d: ours(c, d, True, False, "plain"),
    "+ compiled loss": lambda c, d: ours(c, d, True, True, "plain"),
    "eager, fused loss": lambda c, d: ours(c, d, False, False, "fused"),
    "compiled, fused loss": lambda c, d: ours(c, d, True, True, "fused"),
    "compiled, chunked loss": lambda c, d: ours(c, d, True, True, "chunked"),
    "hf eager": lambda c, d: hf(c, d, False),
    HF_COMPILED: lambda c, d: hf(c, d, True),
}


def timed(step: Callable[[torch.Tensor], None], tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    step(tokens)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="round-robin rounds over the rows")
    ap.add_argument("--steps", type=int, default=3, help="timed steps of each row per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    ap.add_argument("--batch", type=int, default=None, help="default train.micro_batch_size")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of configs/tiny.yaml (the Llama layout is required)")
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                    help="the rows to run, each quoted (default all)")
    args = ap.parse_args()
    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml",
                      ["train.device=cpu", *args.set])
    check_llama_layout(cfg)
    device = torch.device("cpu")
    batch = args.batch or cfg.train.micro_batch_size
    torch.manual_seed(cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.train.seq_len + 1))
    m = cfg.model
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {m.n_layers} layers, "
          f"d_model {m.d_model}, {m.n_heads} heads, vocab {m.vocab_size}, batch {batch} x "
          f"{cfg.train.seq_len}, {cfg.train.precision}, loss chunks of "
          f"{cfg.train.loss_chunk_tokens} tokens; {args.rounds} rounds x {args.steps} steps")
    steps, first, graphs = {}, {}, {}
    for name in args.rows:
        steps[name] = ROWS[name](cfg, device)
        before = graphs_compiled()
        first[name] = timed(steps[name], tokens)
        graphs[name] = graphs_compiled() - before
        for _ in range(args.warmup):
            steps[name](tokens)
        print(f"  built {name}: first step {first[name]:.1f} s, {graphs[name]} new graphs",
              flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            times[name] += [timed(step, tokens) for _ in range(args.steps)]
        print(f"  round {r + 1}/{args.rounds} done", flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    n_tokens = batch * cfg.train.seq_len
    # compile s: the first step's excess over the median where it compiled graphs (a row that
    # reuses the graphs an earlier row compiled, same code and shapes, compiles nothing)
    print(f"\n| row | median ms | fastest ms | tokens/s (median) | compile s (graphs) | "
          f"x {BASELINE} | x {HF_COMPILED} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        base = f"{med[BASELINE] / med[name]:.2f}x" if BASELINE in med else "-"
        ref = f"{med[HF_COMPILED] / med[name]:.2f}x" if HF_COMPILED in med else "-"
        compile_s = f"{first[name] - med[name]:.1f} ({graphs[name]})" if graphs[name] else ""
        print(f"| {name} | {med[name] * 1e3:.1f} | {min(t) * 1e3:.1f} | "
              f"{n_tokens / med[name]:,.0f} | {compile_s} | {base} | {ref} |")


if __name__ == "__main__":
    main()
