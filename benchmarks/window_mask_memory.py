"""Peak memory of one attention forward + backward on the CPU (F.scaled_dot_product_attention,
1 sequence, 4 heads of 32), plain causal (no mask) vs the sliding-window mask that
Transformer._mask builds, for several sequence lengths. Each case runs in its own process and
reports the rise of its peak resident set (VmHWM) over the level after q, k, v exist.

    python benchmarks/window_mask_memory.py [--lengths 4096 8192 16384] [--window 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def one_case(T: int, window: int) -> float:
    import torch
    import torch.nn.functional as F
    from llmtrain.model.transformer import Transformer

    def peak_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, T, 32, requires_grad=True) for _ in range(3))
    base = peak_mib()
    mask = Transformer._mask(window, T, None, "cpu")
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None).sum().backward()
    return peak_mib() - base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--case", type=int, nargs=2, help=argparse.SUPPRESS)  # T window, in-process
    args = ap.parse_args()
    if args.case:
        print(one_case(*args.case))
        return
    print(f"| T | causal, no mask (MiB) | window {args.window}, bool mask (MiB) "
          f"| mask bytes T^2 (MiB) |")
    print("| --- | --- | --- | --- |")
    for T in args.lengths:
        rise = [float(subprocess.run([sys.executable, __file__, "--case", str(T), str(w)],
                                     check=True, capture_output=True, text=True).stdout)
                for w in (0, args.window)]
        print(f"| {T} | {rise[0]:.0f} | {rise[1]:.0f} | {T * T / 2 ** 20:.0f} |")


if __name__ == "__main__":
    main()
