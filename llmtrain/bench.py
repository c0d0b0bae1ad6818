"""`llmtrain bench`: time the real training step (forward, loss, backward, clip, AdamW) on random
tokens, eager and with `parallel.compile` (torch.compile per block), optionally beside the
same-shape Hugging Face model, eager and compiled, measured in the same process (HF's rows train
on the loss its own forward computes, compiled with it). The first step of each row is timed
apart: its excess over the steady-state median is the compile time. The rows run one after the
other; benchmarks/cpu_step.py interleaves them, for shared machines.

MFU = flops_per_token x tokens/s / peak, with flops_per_token = 6 (N_nonembedding + d_model x
vocab) + 12 x layers x d_model x seq (PaLM appendix B; the formula of issue 13), peak = the GPU's
dense bf16 FLOP/s (989e12 for H100 SXM). On the CPU no MFU is printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from typing import Callable

import torch

from llmtrain.config import Config, ConfigError, load_config
from llmtrain.data.loader import Batch
from llmtrain.train.metrics import device_peak_flops, peak_memory_gib
from llmtrain.train.optim import build_optimizer
from llmtrain.train.step import TrainStep


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    """Seconds one call of fn takes: CUDA events on the GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def time_cuda(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return time_cuda

    def time_cpu(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return time_cpu


def make_step(model: torch.nn.Module, cfg: Config, device: torch.device,
              ce_sum_of: Callable[[Batch], torch.Tensor] | None = None
              ) -> Callable[[torch.Tensor], None]:
    """The loop's training step (train/step.py: loss, backward, global-norm clip, AdamW, the
    loss and norm read back); the returned function trains one step on [batch, seq + 1] tokens.
    For llmtrain's model (`ce_sum_of` None) exactly the training loop's: `train.loss` (chunked
    and fused fuse the output layer) and, with `parallel.compile`, the compiled loss. Another
    model's loss comes from `ce_sum_of` (the sum of its token cross entropies over a batch)."""
    opt = build_optimizer(model, cfg.optim, fused=True if device.type == "cuda" else None,
                          cfg=cfg)
    train_step = TrainStep(model, opt, cfg, device, ce_sum_of=ce_sum_of)

    def step(tokens: torch.Tensor) -> None:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        mask = torch.ones(labels.shape, device=labels.device)
        train_step([Batch(inputs, labels, mask, None, [])], cfg.optim.lr)
    return step


def pure_bf16(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """train.precision=bf16_pure: the weights in bf16, as training casts them."""
    return model.to(torch.bfloat16) if cfg.train.precision == "bf16_pure" else model


def hf_ce_sum(run: Callable, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    """The CE sum of a `transformers` causal LM computed by its own forward (its
    ForCausalLMLoss: fp32 logits, cross entropy), as a Hugging Face training run computes it,
    so that the compiled row compiles it with the model: the labels given already shifted
    (`shift_labels`, transformers >= 4.50), summed (`num_items_in_batch=1`), masked tokens
    -100 (its ignore_index)."""
    def ce_sum(batch: Batch) -> torch.Tensor:
        labels = batch.labels.to(device).masked_fill(batch.loss_mask.to(device) == 0, -100)
        labels = labels.contiguous()
        return run(batch.tokens.to(device), labels=labels, shift_labels=labels,
                   num_items_in_batch=1).loss
    return ce_sum


def measure(step: Callable[[torch.Tensor], None], tokens: torch.Tensor, steps: int, warmup: int,
            device: torch.device) -> dict:
    """The first step timed on its own (torch.compile builds its graphs there: its excess over
    the steady-state median is the compile time), `warmup` untimed steps, `steps` timed ones."""
    timer = _timer(device)
    first = timer(lambda: step(tokens))
    for _ in range(warmup):
        step(tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = [timer(lambda: step(tokens)) for _ in range(steps)]
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    med = statistics.median(times)
    return {"first_step_s": first, "step_s_min": min(times), "step_s_median": med,
            "step_s_max": max(times), "tokens_per_s": n_tokens / med,
            "peak_memory_gib": peak_memory_gib(device)}


HF_EXTRA = "pip install 'transformers>=4.50' (or llmtrain's [hf] extra)"


def check_transformers() -> None:
    """`--compare hf` needs transformers >= 4.50 (its loss takes `shift_labels`): a one-line
    error before our own rows are timed, not an ImportError after them."""
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"--compare hf needs the transformers package; {HF_EXTRA}") from None
    version = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    if version < (4, 50):
        raise ConfigError(f"--compare hf needs transformers >= 4.50, found "
                          f"{transformers.__version__}; {HF_EXTRA}")


def check_llama_layout(cfg: Config) -> None:
    m = cfg.model
    if (m.norm, m.norm_position, m.position, m.activation) != ("rmsnorm", "pre", "rope", "swiglu"):
        raise ConfigError("--compare hf needs the Llama layout (model.norm=rmsnorm, "
                          "norm_position=pre, position=rope, activation=swiglu)")


def hf_llama(cfg: Config):
    """The same-shape `transformers.LlamaForCausalLM` (the Llama layout only)."""
    check_llama_layout(cfg)
    m = cfg.model
    from transformers import LlamaConfig, LlamaForCausalLM
    hf_cfg = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model,
                         intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
                         num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
                         max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
                         rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                         attention_bias=m.bias, mlp_bias=m.bias)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def bench(cfg: Config, steps: int = 10, warmup: int = 3, batch: int | None = None,
          compare_hf: bool = False, compiled: bool = True, log=print) -> dict:
    """Rows: llmtrain eager, llmtrain compiled (parallel/compile.py: per block), and with
    `compare_hf` HF eager and HF compiled (torch.compile of the whole model); `compiled=False`
    leaves out the compiled rows."""
    from llmtrain.model import build_model
    from llmtrain.parallel.compile import apply_compile, graphs_compiled
    from llmtrain.config.layout import DistEnv
    from llmtrain.parallel.mesh import resolve_device

    if compare_hf:
        check_llama_layout(cfg)
        check_transformers()
    device = resolve_device(cfg, DistEnv())
    b = batch or cfg.train.micro_batch_size
    torch.manual_seed(cfg.train.seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, cfg.train.seq_len + 1), device=device)
    peak = device_peak_flops(device)
    rows = {}

    def run_cfg(compile_blocks: bool) -> Config:
        return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel,
                                                                     compile=compile_blocks))

    def ours(compile_blocks: bool) -> torch.nn.Module:
        model = build_model(cfg.model, device, seed=cfg.train.seed)
        if compile_blocks:
            apply_compile(model, run_cfg(True), log=None)  # measure() times the compile
        return pure_bf16(model, cfg)

    def record(name: str, step: Callable[[torch.Tensor], None], compiled_row: bool) -> None:
        graphs = graphs_compiled()
        r = measure(step, tokens, steps, warmup, device)
        if peak:
            r["mfu"] = flops_per_token * r["tokens_per_s"] / peak
        if compiled_row:
            r["compile_s"] = r["first_step_s"] - r["step_s_median"]
            r["graphs"] = graphs_compiled() - graphs
        rows[name] = r
        log(f"{name:<20} {r['tokens_per_s']:>12,.0f} tok/s  step "
            f"{r['step_s_median'] * 1e3:8.1f} ms (min {r['step_s_min'] * 1e3:.1f}, "
            f"max {r['step_s_max'] * 1e3:.1f})  "
            f"peak {r['peak_memory_gib']:.2f} GiB" + (f"  MFU {r['mfu']:.1%}" if peak else "")
            + (f"  compile {r['compile_s']:.1f} s ({r['graphs']} graphs)" if compiled_row
               else ""))

    model = ours(False)
    flops_per_token = model.flops_per_token(cfg.train.seq_len)
    log(f"bench: {model.num_params(non_embedding=False):,} parameters, batch {b} x seq "
        f"{cfg.train.seq_len}, {cfg.train.precision}, {device}, our train.loss "
        f"{cfg.train.loss} (HF: its own); first step timed apart (its "
        f"excess over the median: compile), {warmup} warm-up + {steps} timed steps (median)")
    modes = [False, True] if compiled else [False]
    for compile_blocks in modes:
        model = model if not compile_blocks else ours(True)
        record(f"llmtrain {'compiled' if compile_blocks else 'eager'}",
               make_step(model, run_cfg(compile_blocks), device), compile_blocks)
    del model
    if compare_hf:
        hf = pure_bf16(hf_llama(cfg).to(device), cfg)
        for compile_hf in modes:
            run = torch.compile(hf) if compile_hf else hf
            mode = "compiled" if compile_hf else "eager"
            record(f"hf {mode}", make_step(hf, cfg, device, hf_ce_sum(run, device)), compile_hf)
            ratio = rows[f"llmtrain {mode}"]["tokens_per_s"] / rows[f"hf {mode}"]["tokens_per_s"]
            rows[f"hf {mode}"]["ours_over_this"] = ratio
            log(f"llmtrain {mode} / hf {mode}: {ratio:.2f}x tokens/s")
    return {"config": {"batch": b, "seq_len": cfg.train.seq_len, "precision": cfg.train.precision,
                       "device": str(device), "torch": torch.__version__,
                       "flops_per_token": flops_per_token, "peak_flops": peak},
            "results": rows}


def cmd_bench(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set or ())
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError(f"--steps={args.steps} must be >= 1 and --warmup={args.warmup} >= 0")
    out = bench(cfg, steps=args.steps, warmup=args.warmup, batch=args.batch,
                compare_hf=args.compare == "hf", compiled=not args.no_compile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the training step (and the same-shape HF model)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?", help="run config YAML (default: the embedded tiny.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
    p.add_argument("--batch", type=int, help="sequences per step (default train.micro_batch_size)")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' LlamaForCausalLM")
    p.add_argument("--no-compile", action="store_true",
                   help="eager rows only (no torch.compile of ours or of HF)")
    p.add_argument("--json", metavar="OUT", help="write every figure to this JSON file")
    p.set_defaults(func=cmd_bench)
