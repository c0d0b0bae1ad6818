"""Context parallelism (parallel/context.py) at seq 8k on the CPU: activation memory per rank for
cp 1/2/4, and the bytes its all-to-alls send per attention layer against the planner's formula.

Each cp rank is a process (gloo); each runs a stack of llmtrain decoder blocks (tiny width) with
`apply_cp` on its T/cp part of a [1, T, d_model] input (rope at the part's positions), forward and
backward. Memory: the torch profiler's allocator events (benchmarks/activation_memory.py's
`forward_memory`): "kept" = bytes allocated by the forward and still held when it ends (what the
backward needs), "peak" = most bytes allocated at once during forward and backward; per rank,
the largest over the ranks. Bytes: `ContextParallelCore.sent_bytes`, what this rank's forward
all-to-alls hand to other ranks (a chunk a rank keeps is not counted), per layer, against
planner/comm.py `cp_all_to_all_bytes` for the same shape.

    python benchmarks/context_parallel.py [--seq 8192] [--d-model 64] [--heads 8]
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from activation_memory import forward_memory
from llmtrain.config import ModelConfig
from llmtrain.model.build import build_model
from llmtrain.parallel.context import apply_cp, sent_bytes
from llmtrain.planner.comm import cp_all_to_all_bytes

N_LAYERS = 2


def _rank(rank: int, cp: int, port: int, m: ModelConfig, seq: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if cp > 1:
        dist.init_process_group("gloo", rank=rank, world_size=cp)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    torch.manual_seed(0)
    model = build_model(m)
    if cp > 1:
        apply_cp(model, mesh["cp"])
    for p in model.parameters():  # allocated beforehand: not counted as activations
        p.grad = torch.zeros_like(p)
    t = seq // cp
    part = slice(rank * t, (rank + 1) * t)
    x = torch.randn(1, seq, m.d_model, generator=torch.Generator().manual_seed(1))[:, part]
    x = x.contiguous().requires_grad_()
    rope = (model.rope_cos[part], model.rope_sin[part])

    def forward():
        h = x
        for block in model.layers.values():
            h = block(h, rope, None)
        return h

    kept, peak = forward_memory(forward, lambda y: y.sum().backward(), torch.device("cpu"))
    rec = {"kept": kept, "peak": peak, "sent_per_layer": sent_bytes(model) / N_LAYERS}
    if cp > 1:
        recs = [None] * cp
        dist.all_gather_object(recs, rec)
        dist.destroy_process_group()
    else:
        recs = [rec]
    if rank == 0:
        out.put(recs)


def run(cp: int, m: ModelConfig, seq: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")  # the parent has imported torch, run nothing: cheap and safe
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, cp, port, m, seq, q)) for r in range(cp)]
    for p in procs:
        p.start()
    recs = q.get()
    for p in procs:
        p.join()
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=8)
    a = ap.parse_args()
    mib = 2 ** 20
    print(f"seq {a.seq}, d_model {a.d_model}, {a.heads} heads, {N_LAYERS} blocks, fp32, CPU/gloo; "
          f"memory from the torch profiler's allocator events, per rank (largest rank)")
    print(f"{'kv':>3} {'cp':>3} | {'kept MiB':>9} {'x cp/cp1':>8} {'peak MiB':>9} {'x cp/cp1':>8} "
          f"| {'a2a MiB/layer':>13} {'formula':>9} {'ratio':>6}")
    for kv in (a.heads, 2, 1):
        m = ModelConfig(n_layers=N_LAYERS, d_model=a.d_model, n_heads=a.heads, n_kv_heads=kv,
                        vocab_size=64, max_seq_len=a.seq, norm="rmsnorm", activation="swiglu",
                        position="rope", dropout=0.0)
        base = None
        for cp in (1, 2, 4):
            recs = run(cp, m, a.seq)
            kept = max(r["kept"] for r in recs)
            peak = max(r["peak"] for r in recs)
            sent = max(r["sent_per_layer"] for r in recs)
            base = base or (kept, peak)
            formula = cp_all_to_all_bytes(1, a.seq, a.heads, kv, a.d_model // a.heads, cp, 4)
            ratio = f"{sent / formula:6.3f}" if formula else f"{'-':>6}"
            print(f"{kv:3} {cp:3} | {kept / mib:9.2f} {kept * cp / base[0]:8.3f} "
                  f"{peak / mib:9.2f} {peak * cp / base[1]:8.3f} | {sent / mib:13.3f} "
                  f"{formula / mib:9.3f} {ratio}")
    print("x cp/cp1: the rank's bytes x cp / the cp=1 bytes (1.0 = falls exactly as 1/cp)")


if __name__ == "__main__":
    main()
