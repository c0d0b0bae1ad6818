"""Expert-parallel all-to-all volume and time per MoE layer, measured against the theory.

Spawns `--ep` gloo processes on the CPU (NCCL processes with --device cuda, one GPU each); each
holds E/ep experts of one MoE layer (parallel/expert.py) and routes its own `--tokens` random
tokens. Per forward the dispatch and the combine each move the rows routed to experts on other
ranks, d_model values per row:

    measured  = 2 x (rows sent off-rank) x d_model          (mean over ranks, one forward)
    theory    = 2 x k x tokens x d_model x (ep - 1) / ep    (uniform routing, no drops)

(the backward moves as much again). Also the forward + backward time of the layer at ep against
the same layer with all experts local (ep = 1, same tokens per rank).

    python benchmarks/moe_alltoall.py [--ep 2 4] [--tokens 2048] [--d-model 256] [--experts 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmtrain.config import ModelConfig, MoEConfig
from llmtrain.model.moe import MoE


def layer_for(args) -> MoE:
    cfg = ModelConfig(d_model=args.d_model, n_heads=1, activation="swiglu", moe=MoEConfig(
        num_experts=args.experts, router="topk", top_k=args.top_k, capacity_factor=0.0))
    torch.manual_seed(0)
    layer = MoE(cfg)
    layer.init_weights(0.02, 0.02)
    return layer


def timed(layer: MoE, x: torch.Tensor, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        if dist.is_initialized():
            dist.barrier()
        t = time.perf_counter()
        layer(x).sum().backward()
        if dist.is_initialized():
            dist.barrier()
        if i:  # the first is a warm-up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def worker(rank: int, ep: int, args, port: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=ep)
    from torch.distributed.device_mesh import init_device_mesh

    from llmtrain.parallel.expert import apply_ep, build_ep_mesh
    from llmtrain.parallel.mesh import MESH_DIMS
    mesh = init_device_mesh("cpu", (1, 1, ep, 1), mesh_dim_names=MESH_DIMS)
    torch.manual_seed(100 + rank)  # every rank its own tokens
    x = torch.randn(args.tokens, args.d_model)
    local = layer_for(args)
    t_local = timed(local, x, args.repeats)
    layer = layer_for(args)
    apply_ep(layer, build_ep_mesh(mesh, ep))
    t_ep = timed(layer, x, args.repeats)
    rows = layer.experts.a2a_rows_off_rank
    stats = torch.tensor([rows, t_local, t_ep], dtype=torch.float64)
    dist.all_reduce(stats)
    if rank == 0:
        out.put((stats / ep).tolist())
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"CPU gloo, {args.tokens} tokens per rank, d_model {args.d_model}, {args.experts} "
          f"experts, top-{args.top_k}, one MoE layer, forward + backward, median of "
          f"{args.repeats}")
    print(f"{'ep':>3} | {'measured values':>15} {'theory':>12} {'ratio':>6} | "
          f"{'ms ep=1':>8} {'ms ep':>8}")
    ctx = mp.get_context("spawn")
    for i, ep in enumerate(args.ep):
        out = ctx.Queue()
        mp.start_processes(worker, args=(ep, args, 29611 + i, out), nprocs=ep, join=True,
                           start_method="spawn")
        rows, t_local, t_ep = out.get()
        measured = 2 * rows * args.d_model
        theory = 2 * args.top_k * args.tokens * args.d_model * (ep - 1) / ep
        print(f"{ep:>3} | {measured:>15,.0f} {theory:>12,.0f} {measured / theory:>6.3f} | "
              f"{t_local * 1e3:>8.1f} {t_ep * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
