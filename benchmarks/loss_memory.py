"""Peak memory and time of the training loss's forward + backward: the plain loss (the output
layer's [N, V] logits, then train/loss.py's cross entropy) against the chunked one
(`train.loss: chunked`, train/lean_loss.py) and the fused one (`train.loss: fused`: the
gradients computed in the forward, no recomputation), by default on the CPU in fp32.

Each row runs in a fresh subprocess: it allocates the hidden states h [N, D] and the output
weight W [V, D], runs the loss once on a small vocabulary (the first backward's own allocations
are not the loss's), then measures the memory the loss itself takes in one forward + backward,
gradients of h and W included. On the CPU that is the process's peak resident set size
(getrusage's ru_maxrss) less the RSS before (glibc returns allocations this large to the OS when
they are freed, so RSS follows the live tensors); on CUDA the caching allocator's peak of
allocated bytes less those allocated before. The time is the best of further passes in the same
process. `--precision bf16` runs the forward under bf16 autocast, as `train.precision: bf16`.

    python benchmarks/loss_memory.py [--vocab 32768 65536 131072] [--seq 2048] [--batch 2]
        [--d-model 1024] [--chunk 1024] [--device cpu|cuda] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time

LOSSES = ("plain", "chunked", "fused")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def allocated_bytes(device: str) -> int:
    """What the loss's memory is measured from: RSS on the CPU, allocated bytes on CUDA."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def peak_bytes(device: str) -> int:
    import torch
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def one(loss: str, vocab: int, tokens: int, d_model: int, chunk: int, device: str,
        precision: str) -> dict:
    """Run in the subprocess: peak memory and best time of `loss`'s forward + backward."""
    import torch

    from llmtrain.train.lean_loss import linear_cross_entropy_sum
    from llmtrain.train.loss import cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, d_model, generator=g).to(device).requires_grad_()
    w = (torch.randn(vocab, d_model, generator=g) / d_model ** 0.5).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    mask = torch.ones(tokens, device=device)
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def step(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> float:
        h.grad = w.grad = None
        with autocast:
            if loss == "plain":
                ce = cross_entropy_sum((h @ w.t())[None], labels[None], mask[None])
            else:
                ce = linear_cross_entropy_sum(h, w, labels, mask, chunk,
                                              fused=loss == "fused")
        ce.backward()
        return float(ce)  # waits for the device

    step(h, w[:64].detach().clone().requires_grad_(), labels % 64)
    before = allocated_bytes(device)
    value = step(h, w, labels)
    peak = peak_bytes(device) - before
    times = []
    for _ in range(2 if device == "cpu" else 5):
        t0 = time.perf_counter()
        step(h, w, labels)
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": peak, "seconds": min(times), "loss": value / tokens}


def measure(loss: str, vocab: int, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", loss, "--vocab", str(vocab), "--tokens",
           str(tokens), "--d-model", str(args.d_model), "--chunk", str(args.chunk), "--device",
           args.device, "--precision", args.precision]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", nargs="+", type=int, default=[32768, 65536, 131072])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2, help="micro-batch size (sequences)")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--one", choices=LOSSES, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.vocab[0], args.tokens, args.d_model, args.chunk,
                             args.device, args.precision)))
        return
    tokens = args.seq * args.batch
    mib = 2 ** 20
    meter = "RSS" if args.device == "cpu" else "allocated bytes"
    print(f"{args.device} {args.precision}, {tokens} tokens (seq {args.seq} x micro-batch "
          f"{args.batch}), d_model {args.d_model}, chunk {args.chunk} tokens; peak = {meter} "
          f"delta of forward + backward")
    print(f"{'vocab':>7} | {'plain MiB':>9} {'chunked':>7} {'ratio':>5} {'fused':>7} {'ratio':>5} "
          f"| {'plain s':>7} {'chunked':>7} {'ratio':>5} {'fused':>7} {'ratio':>5} | "
          f"{'|loss diff| chunked, fused':>26}")
    for vocab in args.vocab:
        r = {loss: measure(loss, vocab, tokens, args) for loss in LOSSES}
        p = r["plain"]
        mem = " ".join(f"{r[k]['peak_bytes'] / mib:>7,.0f} "
                       f"{r[k]['peak_bytes'] / p['peak_bytes']:>5.2f}" for k in LOSSES[1:])
        sec = " ".join(f"{r[k]['seconds']:>7.2f} {r[k]['seconds'] / p['seconds']:>5.2f}"
                       for k in LOSSES[1:])
        diff = ", ".join(f"{abs(p['loss'] - r[k]['loss']):.1e}" for k in LOSSES[1:])
        print(f"{vocab:>7} | {p['peak_bytes'] / mib:>9,.0f} {mem} | {p['seconds']:>7.2f} {sec} | "
              f"{diff:>26}", flush=True)


if __name__ == "__main__":
    main()
