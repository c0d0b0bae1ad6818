"""optimizer.step() time, Muon (optim.name: muon) vs AdamW, on the CPU: configs/tiny.yaml's model,
and one 1B-like transformer block (d_model 2048, 16 heads, SwiGLU d_ff 5504: Llama-style 1B
proportions, the embedding and output layer left out so that only the block's step is timed).

    python benchmarks/optimizer_step.py [--steps 5] [--rounds 2] [--layer-steps 1]
        [--layer-scale 4]

Gradients are random and fixed; each timed step is one `optimizer.step()` after WARMUP
untimed ones, the optimizers alternating round by round so that background load hits all alike;
the table shows medians. Muon is timed with Newton-Schulz in bf16 (torch.optim.Muon's choice,
for GPU tensor cores) and in fp32 (optim.muon_ns_dtype); a CPU without bf16 matrix units runs
bf16 matmuls far slower than fp32, so the script also times one bf16 and one fp32 GEMM to show
the rate. `--layer-scale K` times the 1B-like block's Newton-Schulz on a block K times narrower
in every dimension and scales it by its FLOPs (K^3, printed as an estimate); `--layer-scale 1`
times the real shape (hours on a CPU without bf16 GEMMs). The load average
(1, 5, 15 min) is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from llmtrain.config import load_config
from llmtrain.model.build import build_model
from llmtrain.train.optim import build_optimizer, is_muon_param, newton_schulz

LAYER = {"model.n_layers": 1, "model.d_model": 2048, "model.n_heads": 16, "model.d_ff": 5504,
         "model.vocab_size": 256, "model.max_seq_len": 128, "model.activation": "swiglu"}


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# Untimed steps first: the first allocates the states, and the next few were still 10-40x slower
# than the steady state on the VM (928, 515, 256, 37, 25 ms for AdamW on the tiny model)
WARMUP = 4


# (optim.name, optim.muon_ns_dtype) of each timed column
OPTIMIZERS = {"AdamW": ("adamw", "bfloat16"), "Muon, bf16 NS": ("muon", "bfloat16"),
              "Muon, fp32 NS": ("muon", "float32")}


def timed_steps(model: nn.Module, cfg, name: str, steps: int,
                ns_dtype: str = "bfloat16") -> list[float]:
    """`steps` timed optimizer steps of optimizer `name` (Newton-Schulz in `ns_dtype`) on
    `model` (gradients set), after WARMUP untimed ones."""
    o = cfg.optim
    o.name, o.muon_ns_dtype = name, ns_dtype
    opt = build_optimizer(model, o)
    for _ in range(WARMUP):
        opt.step()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t)
    return out


def with_grads(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return model


def block_only(model: nn.Module) -> nn.Module:
    """The transformer blocks of `model` under their own names (`layers.<i>.`), nothing else."""
    holder = nn.Module()
    holder.layers = model.layers
    return holder


def ns_flops(shape: tuple[int, ...], ns_steps: int) -> float:
    """FLOPs of torch's quintic Newton-Schulz on an A x B matrix (A <= B after its transpose):
    per iteration X X^T (2 A^2 B), the Gram polynomial (2 A^3) and its product with X (2 A^2 B)."""
    a, b = sorted(shape[-2:])
    return ns_steps * (4 * a * a * b + 2 * a ** 3)


def gemm_rate(n: int, dtype: torch.dtype) -> float:
    """GFLOP/s of one n x n matmul in `dtype` (best of 2)."""
    x = torch.randn(n, n).to(dtype)
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        x @ x
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per round (tiny model)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--layer-steps", type=int, default=1, help="timed steps, 1B-like block")
    ap.add_argument("--layer-scale", type=int, default=4)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average before: {load()}")
    rows = []

    cfg = load_config(None, ["train.device=cpu"])
    tiny = with_grads(build_model(cfg.model, "cpu"))
    times: dict[str, list[float]] = {col: [] for col in OPTIMIZERS}
    for _ in range(args.rounds):
        for col, (name, ns_dtype) in OPTIMIZERS.items():
            times[col] += timed_steps(tiny, cfg, name, args.steps, ns_dtype)
    n_muon = sum(p.numel() for n, p in tiny.named_parameters() if is_muon_param(n, p))
    rows.append((f"tiny ({sum(p.numel() for p in tiny.parameters()) / 1e6:.2f}M params, "
                 f"{n_muon / 1e6:.2f}M in Muon)",
                 {col: statistics.median(t) for col, t in times.items()}, ""))

    cfg = load_config(None, ["train.device=cpu", *(f"{k}={v}" for k, v in LAYER.items())])
    block = with_grads(block_only(build_model(cfg.model, "cpu")))
    step = {"AdamW": statistics.median(timed_steps(block, cfg, "adamw", args.layer_steps))}
    shapes = [tuple(p.shape) for n, p in block.named_parameters() if is_muon_param(n, p)]
    k = args.layer_scale
    notes = []
    if k > 1:  # everything but Newton-Schulz (momentum, decay, update: elementwise) at full size
        rest = statistics.median(timed_steps_without_ns(block, cfg, args.layer_steps))
        notes.append(f"rest of the step at full size {rest * 1e3:.0f} ms")
    for col, (name, ns_dtype) in list(OPTIMIZERS.items())[1:]:
        if k == 1:
            step[col] = statistics.median(timed_steps(block, cfg, name, args.layer_steps,
                                                      ns_dtype))
            continue
        # Newton-Schulz on the K-times narrower matrices, scaled by the FLOP ratio K^3
        small = [tuple(s // k for s in shape) for shape in shapes]
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        for s in small:
            newton_schulz(torch.randn(s, generator=g), cfg.optim.muon_ns_steps, ns_dtype)
        ns_small = time.perf_counter() - t
        step[col] = rest + ns_small * k ** 3
        notes.append(f"{ns_dtype} NS at 1/{k} width {ns_small:.2f} s")
    note = f"estimate: NS x {k}^3 + the rest ({'; '.join(notes)})" if k > 1 else ""
    flops = sum(ns_flops(s, cfg.optim.muon_ns_steps) for s in shapes)
    rows.append((f"1B-like block (d_model 2048, d_ff 5504, {len(shapes)} matrices, "
                 f"{sum(a * b for a, b in shapes) / 1e6:.1f}M params; NS {flops / 1e12:.2f} TFLOP)",
                 step, note))

    muon_cols = list(OPTIMIZERS)[1:]
    print("\n| model | " + " | ".join(f"{c} step" for c in OPTIMIZERS) + " | "
          + " | ".join(f"{c} / AdamW" for c in muon_cols) + " | note |")
    print("| --- |" + " ---: |" * (len(OPTIMIZERS) + len(muon_cols)) + " --- |")
    for name, step, note in rows:
        print(f"| {name} | " + " | ".join(f"{step[c] * 1e3:,.1f} ms" for c in OPTIMIZERS) + " | "
              + " | ".join(f"{step[c] / step['AdamW']:,.1f}x" for c in muon_cols)
              + f" | {note} |")
    print(f"\nGEMM 1024^2 on this CPU: bf16 {gemm_rate(1024, torch.bfloat16):.2f} GFLOP/s, "
          f"fp32 {gemm_rate(1024, torch.float32):.2f} GFLOP/s")
    print(f"load average after: {load()}")


def timed_steps_without_ns(model: nn.Module, cfg, steps: int) -> list[float]:
    """Muon steps of `model` with Newton-Schulz replaced by a bf16 copy (its input cast): the
    elementwise part of the Muon step and AdamW's part, at full size (the same for both NS
    dtypes, up to the update's dtype)."""
    import llmtrain.train.optim as optim
    real = optim.MuonAdamW.orthogonalize
    optim.MuonAdamW.orthogonalize = lambda self, update, p, ns_steps: update.bfloat16()
    try:
        return timed_steps(model, cfg, "muon", steps)
    finally:
        optim.MuonAdamW.orthogonalize = real


if __name__ == "__main__":
    main()
