"""Tokens/s of the MoE expert computation: one grouped matmul over expert-sorted tokens
(`torch._grouped_mm`) vs. a loop over experts on contiguous slices vs. bmm on padded
[E, capacity, d] buffers, forward + backward, on the tokens one router actually produced.

    python benchmarks/moe.py [--device cpu] [--tokens 4096] [--d-model 256] [--experts 8]
                             [--top-k 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from llmtrain.config import ModelConfig, MoEConfig
from llmtrain.model.moe import MoE, _grouped_mm_works


def padded_bmm(layer: MoE, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The capacity-buffer layout (GShard/Switch on TPU): scatter the sorted tokens into
    [E, max count, d] zeros, one bmm per weight, gather back."""
    e = layer.experts
    n_exp, cap = counts.numel(), int(counts.max())
    first = (counts.cumsum(0) - counts).repeat_interleave(counts)
    rows = torch.arange(x.shape[0], device=x.device) - first
    experts = torch.arange(n_exp, device=x.device).repeat_interleave(counts)
    buf = x.new_zeros(n_exp, cap, x.shape[1]).index_put((experts, rows), x)
    y = e._mlp(buf, e.w1, e.w2, e.w3, torch.bmm)
    return y[experts, rows]


def bench(fn, repeats: int, sync) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="best of N (default 5)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, {args.dtype}, {args.tokens} tokens, d_model {args.d_model}, "
          f"top-{args.top_k}, forward + backward, best of {args.repeats}; "
          f"torch._grouped_mm usable: {_grouped_mm_works(device, dtype)}")
    print(f"{'experts':>7} {'d_ff':>5} {'max/mean':>8} | {'impl':<10} {'ms':>8} {'tokens/s':>11}"
          f" {'vs loop':>7}")
    for n_exp in args.experts:
        cfg = ModelConfig(d_model=args.d_model, n_heads=1, moe=MoEConfig(
            num_experts=n_exp, router="topk", top_k=args.top_k, capacity_factor=0.0))
        torch.manual_seed(0)
        layer = MoE(cfg).to(device)
        layer.init_weights(0.02, 0.02)
        layer = layer.to(dtype)
        x = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype)
        # the routed, expert-sorted tokens of one real forward
        _, _, experts, _ = layer.router(x)
        flat = experts.t().reshape(-1)
        counts = torch.bincount(flat, minlength=n_exp)
        token = torch.arange(args.tokens, device=device).repeat(args.top_k)
        xs = x[token[flat.argsort(stable=True)]]
        xs.requires_grad_()
        rows = {}

        def run(impl):
            def step():
                if impl == "padded_bmm":
                    y = padded_bmm(layer, xs, counts)
                else:
                    layer.experts.impl = impl
                    y = layer.experts(xs, counts)
                y.backward(torch.ones_like(y))
            return step

        impls = ["loop", "padded_bmm"] + (["grouped_mm"] if _grouped_mm_works(device, dtype)
                                          else [])
        for impl in impls:
            run(impl)()  # warm up
            rows[impl] = bench(run(impl), args.repeats, sync)
        imb = float(counts.max()) / float(counts.float().mean())
        for impl in impls:
            s = rows[impl]
            print(f"{n_exp:>7} {cfg.ffn_dim:>5} {imb:>8.2f} | {impl:<10} {s * 1e3:>8.2f} "
                  f"{args.tokens / s:>11,.0f} {rows['loop'] / s:>6.2f}x")


if __name__ == "__main__":
    main()
