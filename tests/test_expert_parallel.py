"""Expert parallelism on the CPU (gloo, torchrun): ep=2 over dp=2 and ep=2 over dp=4 (two expert
replicas) against the same data-parallel run with ep=1 (and the single-process run); MoE under
tensor parallelism, ep x tp and ep at ZeRO 2/3 against the single-process run: per-step losses
and gradient norms within 1e-5 relative and every final weight, experts included, after
gathering the DCP checkpoints; one-line errors for layouts expert parallelism does not
support."""

from __future__ import annotations

import pytest

from helpers import (as_overrides, assert_weights_close, cli_train, cut_back, final_weights,
                     free_port, read_losses, read_metric, run_train, seeded_moe, tiny_overrides)
from llmtrain.config import ConfigError, load_config

STEPS = 5
# top-2 of 4 experts in every layer, with capacity: drops happen, so the per-rank routing and
# capacity must be exactly those of the data-parallel run
MOE = {"model.moe.num_experts": 4, "model.moe.router": "topk", "model.moe.top_k": 2,
       "model.moe.capacity_factor": 1.0, "model.moe.every_n_layers": 1,
       "model.activation": "swiglu", "model.dropout": 0.0, "train.steps": STEPS}


def run_args(run, **extra):
    return tiny_overrides(run, **MOE, **extra)


def grad_norms(run):
    return read_metric(run, "grad_norm")


@pytest.mark.parametrize("nproc, extra", [(2, {}), (4, {"train.micro_batch_size": 2})],
                         ids=["dp2-ep2", "dp4-ep2"])
def test_expert_parallel_equals_data_parallel(tmp_path, nproc, extra):
    ref, ep = tmp_path / "ep1", tmp_path / "ep2"
    run_train(run_args(ref, **extra), nproc=nproc)
    r = run_train(run_args(ep, **extra, **{"parallel.ep": 2}), nproc=nproc)
    assert "drop" in (ep / "metrics.jsonl").read_text()  # the MoE metrics were logged
    assert read_losses(ep) == pytest.approx(read_losses(ref), rel=1e-5)
    # the gradient norm covers the expert gradients' scale, which AdamW's update would hide
    assert grad_norms(ep) == pytest.approx(grad_norms(ref), rel=1e-5)
    assert_weights_close(final_weights(ep, STEPS), final_weights(ref, STEPS))
    assert "layout: world" in r.stdout
    # each rank holds half of every MoE layer's experts: ep=2 saves exactly that many bytes
    import json
    m = load_config(None, run_args(ep)).model
    per_expert = 3 * m.d_model * m.ffn_dim * 4  # w1, w2, w3 of one expert, fp32
    saved = 2 * 2 * per_expert  # 2 of 4 experts in each of the 2 layers
    for i in range(nproc):
        a, b = (json.loads((d / f"memory_rank{i}.json").read_text()) for d in (ref, ep))
        assert a["param_bytes"] - b["param_bytes"] == saved
        assert a["optim_bytes"] - b["optim_bytes"] == 2 * saved
    if nproc == 2:  # and the data-parallel run is the single-process run
        single = tmp_path / "single"
        assert cli_train(run_args(single)) == 0
        assert read_losses(ep) == pytest.approx(read_losses(single), rel=1e-5)


@pytest.mark.parametrize("sets, world, message", [
    ({"parallel.ep": 2, "model.moe.num_experts": 0}, 2, "needs an MoE model"),
    ({"parallel.ep": 3, "model.moe.num_experts": 4}, 3, "does not divide model.moe.num_experts=4"),
    ({"parallel.ep": 4, "model.moe.num_experts": 4}, 2, "must divide the data-parallel shard"),
    # one GeLU MoE layer: 2 expert tensors cannot be split over 4 replicas (dp 8 / ep 2)
    ({"parallel.ep": 2, "model.moe.num_experts": 4, "parallel.zero_stage": 1,
      "model.activation": "gelu", "model.n_layers": 2, "model.moe.every_n_layers": 2}, 8,
     r"splits the expert weights \(2 tensors\) over the 4 ranks"),
    # pp=2 over 4 GeLU layers, MoE every 2nd: each stage has 2 expert tensors, 4 replicas each
    ({"parallel.ep": 2, "model.moe.num_experts": 4, "parallel.zero_stage": 1, "parallel.pp": 2,
      "model.tie_embeddings": False, "model.activation": "gelu", "model.n_layers": 4,
      "model.moe.every_n_layers": 2}, 16,
     r"\(2 tensors in the pipeline stage with the fewest\) over the 4 ranks"),
    ({"parallel.ep": 2, "model.moe.num_experts": 4, "parallel.engine": "deepspeed"}, 2,
     "parallel.engine=deepspeed runs data parallelism"),
])
def test_expert_parallel_config_errors(sets, world, message):
    with pytest.raises(ConfigError, match=message) as e:
        batch = {"train.micro_batch_size": 1, "train.global_batch_size": 24}
        load_config(None, as_overrides({**batch, **sets}), world_size=world)
    assert "\n" not in str(e.value)


# MoE layers under tensor parallelism (router whole, experts split over hidden units, shared
# expert a dense FFN), with expert parallelism and at ZeRO 2/3: name -> (processes, overrides)
SHARED = {"model.moe.n_shared_experts": 1}
LAYOUTS = {
    "tp2": (2, {"parallel.tp": 2}),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "dp2xtp2-ep2": (4, {"parallel.tp": 2, "parallel.ep": 2}),
    "dp2-ep2-zero2": (2, {"parallel.ep": 2, "parallel.zero_stage": 2}),
    "dp2-ep2-zero3": (2, {"parallel.ep": 2, "parallel.zero_stage": 3}),
    # two replicas of each expert: FSDP shards them over the replicas
    "dp4-ep2-zero3": (4, {"parallel.ep": 2, "parallel.zero_stage": 3,
                          "train.micro_batch_size": 2}),
    "dp2xtp2-ep2-zero3": (4, {"parallel.tp": 2, "parallel.ep": 2, "parallel.zero_stage": 3}),
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Single-process runs with shared experts, one per micro-batch size (routing and capacity
    are per micro-batch), built on first use."""
    root, cache = tmp_path_factory.mktemp("moe_single"), {}

    def get(micro_batch: int):
        if micro_batch not in cache:
            run = root / f"mb{micro_batch}"
            args = run_args(run, **SHARED, **{"train.micro_batch_size": micro_batch})
            assert cli_train(args) == 0
            cache[micro_batch] = (read_losses(run), grad_norms(run), final_weights(run, STEPS))
        return cache[micro_batch]
    return get


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_moe_layout_matches_single_process(name, tmp_path, single_process):
    nproc, par = LAYOUTS[name]
    losses, norms, weights = single_process(par.get("train.micro_batch_size", 4))
    run = tmp_path / name
    run_train(run_args(run, **SHARED, **par), nproc=nproc)
    assert read_losses(run) == pytest.approx(losses, rel=1e-5)
    # sequence parallelism sums the norms' gradients over sequence shards in another order:
    # dense models show the same 4e-5 there, and this MoE model 1.15e-4 at step 5 from the
    # layout-free initial weights (model/init.py) while its losses stay within 1e-5
    rel = 2e-4 if par.get("parallel.sequence_parallel") else 1e-5
    assert grad_norms(run) == pytest.approx(norms, rel=rel)
    assert_weights_close(final_weights(run, STEPS), weights)


@pytest.mark.parametrize("nproc, par", [
    (2, {"parallel.ep": 2}),
    (4, {"parallel.ep": 2, "parallel.tp": 2, "parallel.zero_stage": 3}),
], ids=["dp2-ep2", "dp2xtp2-ep2-zero3"])
def test_expert_parallel_checkpoint_resumes_without_it(tmp_path, nproc, par):
    """An expert-parallel checkpoint (experts as DTensors of global shape [E, ...], over ep, or
    over (ep, tp) and sharded by FSDP) resumed at ep=1 on 2 ranks (DDP) after step 3 continues
    exactly as the uninterrupted expert-parallel run."""
    run = tmp_path / "ep2"
    run_train(run_args(run, **par, **{"checkpoint.every": 3}), nproc=nproc)
    full = read_losses(run)
    cut_back(run, 3, STEPS)
    r = run_train(run_args(run, **{"checkpoint.every": 3}), nproc=2)
    assert "resumed from" in r.stdout and "step_3" in r.stdout
    assert read_losses(run) == pytest.approx(full, rel=1e-5)


def test_expert_parallel_with_zero1_equals_without(tmp_path):
    """ep=2 over dp=4 with ZeRO-1 (PartitionedAdamW: dense parameters partitioned over the 4 dp
    ranks, expert weights over the 2 ranks holding the same experts) equals ep=2 at ZeRO 0, and
    every optimizer state is held by exactly one rank."""
    import json
    extra = {"train.micro_batch_size": 2, "parallel.ep": 2}
    ref, z1 = tmp_path / "zero0", tmp_path / "zero1"
    run_train(run_args(ref, **extra), nproc=4)
    z1_args = run_args(z1, **extra, **{"parallel.zero_stage": 1, "checkpoint.every": 3})
    run_train(z1_args, nproc=4)
    assert read_losses(z1) == pytest.approx(read_losses(ref), rel=1e-5)
    assert grad_norms(z1) == pytest.approx(grad_norms(ref), rel=1e-5)
    assert_weights_close(final_weights(z1, STEPS), final_weights(ref, STEPS))
    full = [json.loads((ref / f"memory_rank{i}.json").read_text())["optim_bytes"]
            for i in range(4)]
    part = [json.loads((z1 / f"memory_rank{i}.json").read_text())["optim_bytes"]
            for i in range(4)]
    m = load_config(None, run_args(z1)).model
    # AdamW's m and v (fp32) of all experts: 2 MoE layers x 4 experts x (w1, w2, w3)
    experts = 2 * 4 * 2 * 4 * 3 * m.d_model * m.ffn_dim
    dense = full[0] - experts / 2  # ZeRO 0: every rank holds all dense states, half the experts
    assert sum(part) == dense + experts, "every state held by exactly one rank"
    assert all(a < b for a, b in zip(part, full))  # whole tensors: the split is not even
    # the partitioned states (expert ones as DTensors held by one replica) resume exactly
    cut_back(z1, 3, STEPS)
    assert "resumed from" in run_train(z1_args, nproc=4).stdout
    assert read_losses(z1) == pytest.approx(read_losses(ref), rel=1e-5)


def _seeded_layer():
    """The MoE layer of the layer-level test, with the same weights in every process: top-2 of 4
    SwiGLU experts with capacity (drops happen)."""
    from llmtrain.config import MoEConfig
    return seeded_moe(0.2, d_model=16, d_ff=32, activation="swiglu", moe=MoEConfig(
        num_experts=4, router="topk", top_k=2, capacity_factor=1.0))


def _layer_worker(rank: int, world: int, tp: int, port: int, out: str) -> None:
    """One MoE layer (top-2 of 4 experts, drops) split over ep=world/tp and tp; each dp rank (its
    tp ranks alike) feeds its own tokens; saves the output and every local gradient."""
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llmtrain.parallel.expert import apply_ep, build_ep_mesh
    from llmtrain.parallel.mesh import MESH_DIMS
    from llmtrain.parallel.tensor import apply_tp_moe, local_tensor
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        layer = _seeded_layer()
        mesh = init_device_mesh("cpu", (1, 1, world // tp, 1, tp), mesh_dim_names=MESH_DIMS)
        if tp > 1:
            apply_tp_moe(layer, mesh["tp"])
        apply_ep(layer, build_ep_mesh(mesh, world // tp))
        x, target = _layer_input(rank // tp)
        y = layer(x)
        (y * target).sum().backward()
        grads = {name: local_tensor(p.grad) for name, p in layer.named_parameters()}
        torch.save({"y": y.detach(), **grads}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _layer_input(dp_rank: int):
    import torch
    g = torch.Generator().manual_seed(dp_rank)
    return torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)


def _spawn(fn, args, nprocs: int, timeout: float = 90) -> None:
    """Run fn(rank, *args) in `nprocs` processes; fail (not hang) on a collective mismatch."""
    import time

    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):  # False until every process has exited
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the expert-parallel processes did not finish: a collective mismatch")


@pytest.mark.parametrize("world, tp", [(2, 1), (4, 2)], ids=["ep2", "ep2xtp2"])
def test_expert_parallel_layer_outputs_and_expert_gradients(tmp_path, world, tp):
    """ep=2 and ep=2 x tp=2 against the unsharded layer run on each dp rank's tokens: outputs
    and router gradients per rank, and each rank's slice (its experts, its hidden units) of the
    expert gradients summed over the ep group's tokens, within 1e-5 relative (fp32)."""
    import torch

    _spawn(_layer_worker, (world, tp, free_port(), str(tmp_path)), world)
    ref = _seeded_layer()
    ys, router_grads = [], []
    for dp_rank in range(world // tp):  # expert gradients accumulate over the dp ranks' tokens
        x, target = _layer_input(dp_rank)
        router_before = ref.router.gate.weight.grad
        router_before = 0 if router_before is None else router_before.clone()
        y = ref(x)
        (y * target).sum().backward()
        ys.append(y.detach())
        router_grads.append(ref.router.gate.weight.grad - router_before)
    assert ref.stats["drop_frac"] > 0  # capacity binds: dropping must match too
    ep = world // tp
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        e, t = (rank // tp) % ep, rank % tp  # this rank's expert chunk and hidden-unit chunk
        torch.testing.assert_close(got["y"], ys[rank // tp], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["router.gate.weight"], router_grads[rank // tp],
                                   rtol=1e-5, atol=1e-6)
        for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)):
            full = getattr(ref.experts, name).grad.chunk(ep, 0)[e].chunk(tp, dim)[t]
            torch.testing.assert_close(got[f"experts.{name}"], full, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


def _skewed_layer():
    """Top-1 of 4 SwiGLU experts without capacity, with the same weights in every process; every
    token goes to expert 0 or 1, so ep rank 1 (experts 2, 3) gets none."""
    import torch

    from llmtrain.config import MoEConfig
    layer = seeded_moe(0.02, d_model=16, activation="swiglu", moe=MoEConfig(
        num_experts=4, router="topk", top_k=1, capacity_factor=0.0))
    with torch.no_grad():
        layer.router.gate.weight[2:] = -10.0
    return layer


def _skewed_worker(rank: int, port: int, out: str) -> None:
    import os

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llmtrain.parallel.expert import apply_ep, build_ep_mesh
    from llmtrain.parallel.mesh import MESH_DIMS
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        layer = _skewed_layer()
        x = torch.rand(8, 16, generator=torch.Generator().manual_seed(rank)) + 0.1 + rank
        apply_ep(layer, build_ep_mesh(init_device_mesh("cpu", (1, 1, 2, 1, 1),
                                                       mesh_dim_names=MESH_DIMS), 2))
        y = layer(x)
        y.square().sum().backward()  # hung here before: rank 1 skipped its backward all-to-alls
        w1 = layer.experts.w1  # no gradient at all on the idle rank: its experts saw nothing
        grad = w1.grad.to_local() if w1.grad is not None else torch.zeros_like(w1.to_local())
        torch.save({"y": y.detach(), "w1_grad": grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_rank_whose_experts_get_no_tokens_still_joins_the_backward(tmp_path):
    """All tokens routed to the experts of ep rank 0: rank 1 receives nothing, yet both ranks
    finish the backward (within a timeout), with the outputs of the unsharded layer and zero
    gradients for the idle experts."""
    import torch

    _spawn(_skewed_worker, (free_port(), str(tmp_path)), 2, timeout=60)
    ref = _skewed_layer()
    grad = torch.zeros_like(ref.experts.w1)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        x = torch.rand(8, 16, generator=torch.Generator().manual_seed(rank)) + 0.1 + rank
        ref.zero_grad()
        y = ref(x)
        y.square().sum().backward()
        torch.testing.assert_close(got["y"], y.detach())
        grad += ref.experts.w1.grad
        assert got["w1_grad"].shape[0] == 2
    g0 = torch.load(tmp_path / "rank0.pt", weights_only=True)["w1_grad"]
    g1 = torch.load(tmp_path / "rank1.pt", weights_only=True)["w1_grad"]
    torch.testing.assert_close(torch.cat([g0, g1]), grad)  # summed over both ranks' tokens
    assert g1.abs().sum() == 0
