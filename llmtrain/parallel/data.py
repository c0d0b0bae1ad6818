"""Data parallelism with ZeRO stages (Rajbhandari et al. 2020) over the `dp_shard` mesh dimension.

The standard torch mapping of the stages:
  0  DistributedDataParallel over all dp ranks: everything replicated, gradients all-reduced.
  1  DDP + ZeroRedundancyOptimizer over dp_shard: each rank keeps and updates the AdamW states of
     its partition of the parameters, then broadcasts the updated parameters.
  2  FSDP2 `fully_shard(reshard_after_forward=False)`: parameters are gathered once per step and
     kept for the backward, gradients reduce-scattered (sharded), optimizer states sharded.
     (FSDP2 stores the parameters sharded between steps, so this is stage 2 plus at-rest
     parameter sharding; torch has no stage-2 primitive with replicated parameters.)
  3  FSDP2 `fully_shard(reshard_after_forward=True)`: parameters are re-gathered for the backward;
     per block, with the next block prefetched (FSDP2's implicit forward/backward prefetch;
     on the CPU, where the collectives cannot overlap, not in the backward:
     `without_overlap_buffers`).
With tensor parallelism (DTensor parameters) stages 0 and 1 cannot use DDP or
ZeroRedundancyOptimizer, which handle plain tensors only; there `GradReducer` averages the
gradients over the dp ranks as DDP does, in buckets of local shards all-reduced asynchronously
from gradient hooks during the last micro-batch's backward, and stage 1 is `PartitionedAdamW`:
the same partition-step-broadcast as ZeroRedundancyOptimizer, over the local shards.
With dp_replicate > 1, stages 2/3 are HSDP: `fully_shard` on the 2-D (dp_replicate, dp_shard)
mesh shards within a replica group and all-reduces across them. bf16 runs keep bf16 compute
params and fp32 gradient reduction (MixedPrecisionPolicy); `parallel.offload=cpu` keeps the
stage-3 shards and optimizer step on the CPU (CPUOffloadPolicy).
`optim.name: muon` builds the same with `ShardedMuonAdamW` (and `PartitionedMuonAdamW`), which
orthogonalises each sharded matrix whole.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from llmtrain.config import Config
from llmtrain.model.moe import moe_layers
from llmtrain.parallel.expert import ExpertParallelExperts
from llmtrain.parallel.parallelized import GradSync
from llmtrain.parallel.tensor import local_tensor
from llmtrain.train.optim import (NS_DTYPES, MuonAdamW, adamw_kernel, muon_options,
                                  newton_schulz, optimizer_groups, params_device_type,
                                  split_by_kind)


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All data-parallel and context-parallel ranks as one dimension: the gradient all-reduce
    group. Context-parallel ranks hold different tokens of the same sequences, so their
    gradients are averaged with the data-parallel ranks' (the step scales the loss by this
    group's size: parallel/context.py, train/step.py)."""
    return mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")


def shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks ZeRO shards states over: dp_shard, times cp where context parallelism splits
    the sequences (torchtitan's "dp_shard_cp": cp ranks hold the same parameters)."""
    if mesh["cp"].size() == 1:
        return mesh["dp_shard"]
    return mesh["dp_shard", "cp"]._flatten("dp_shard_cp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of every `layers` ModuleDict: `layers` of a decoder, `encoder.layers` and
    `decoder.layers` of an encoder-decoder (one FSDP unit each)."""
    return [block for name, mod in model.named_modules()
            if name.rsplit(".", 1)[-1] == "layers" and isinstance(mod, nn.ModuleDict)
            for block in mod.values()]


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, cfg: Config,
               device: torch.device) -> nn.Module:
    p = cfg.parallel
    hsdp = mesh["dp_replicate"].size() > 1
    shard = shard_mesh(mesh)
    fsdp_mesh = mesh["dp_replicate", shard.mesh_dim_names[0]] if hsdp else shard
    kwargs = {"mesh": fsdp_mesh, "reshard_after_forward": p.zero_stage == 3}
    if cfg.train.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    if p.offload == "cpu" and device.type != "cpu":  # on a CPU run the states are there already
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # the dense gradients' divisor: FSDP averages them over dp_replicate x dp_shard x cp
    dp_size = mesh["dp_replicate"].size() * shard.size()
    for block in transformer_blocks(model):
        for moe in moe_layers(block).values():
            if isinstance(moe.experts, ExpertParallelExperts):  # DTensors over ep: FSDP
                # shards them over the ranks holding the same experts, as a unit of its own
                _shard_experts(moe.experts, moe.experts.replicate_mesh, dp_size, kwargs)
                if device.type == "cpu":
                    without_overlap_buffers(moe.experts)
        fully_shard(block, **kwargs)
        if device.type == "cpu":
            without_overlap_buffers(block)
    # the root unit holds embeddings, final norm and output; the root is never resharded after
    # forward (its output layer runs first in the backward)
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


def without_overlap_buffers(module: nn.Module) -> None:
    """Turn off, for one FSDP2 unit, the two buffers FSDP2 keeps to overlap communication with
    computation, where nothing overlaps: on the CPU its collectives are synchronous (gloo, no
    streams), so the backward's prefetch of the next block only gathers it earlier, and the
    reduce-scatter input it keeps alive until the next block's reduction (the comm-stream
    keepalive, `reduce_scatter_states`) is finished with. Each held one block: at 278M
    parameters dp8 ZeRO-3 the steady-state peak falls from 883 to 745 MiB, 1.46x -> 1.23x the
    sharded states plus one block (docs/performance.md). On a GPU both buy overlap and stay.
    FSDP2 has no public switch for either (FSDP1's `backward_prefetch=None` was one), so this
    sets them on its parameter groups; a torch without these attributes keeps its defaults."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]
    for group in groups:
        if group is None or not hasattr(group, "_backward_prefetch"):
            continue
        group._backward_prefetch = _no_prefetch
        group.post_backward = _releasing(group, group.post_backward)


def _no_prefetch() -> None:
    """(FSDP2's own prefetch also pops the group's post-forward index, which only the prefetch
    reads; the indices left are cleared when the backward finishes.)"""
    return None


def _releasing(group, post_backward):
    """`post_backward` followed by dropping the reduce-scatter input FSDP2 keeps for its
    comm stream (the reduction itself has completed: gloo's collective is synchronous)."""
    def run(*args, **kwargs):
        out = post_backward(*args, **kwargs)
        ctx = group.comm_ctx  # (set at FSDP's lazy init)
        kept = getattr(ctx, "reduce_scatter_states", None)
        if isinstance(kept, list):
            kept.clear()
        elif hasattr(ctx, "reduce_scatter_state"):  # torch before the list: one kept input
            ctx.reduce_scatter_state = None
        return out
    return run


def _shard_experts(experts: nn.Module, ep_replicate: DeviceMesh, dp_size: int,
                   kwargs: dict) -> None:
    """One layer's ep-sharded experts as an FSDP unit over `ep_replicate`. Their gradients are
    summed over it and divided by the whole dp size, as the dense ones are averaged (see
    parallel/expert.py): FSDP's own mean would divide by the replicas only. Sum-then-divide
    (force_sum_reduction) over more than one replica, because gloo has no PREMUL_SUM, the op FSDP
    uses for a custom divisor; not over one, where torch 2.13's FSDP would divide twice (by the
    factor when it skips the reduce-scatter, then again as its post-divide).
    """
    fully_shard(experts, **{**kwargs, "mesh": ep_replicate})
    experts.set_gradient_divide_factor(float(dp_size))
    if ep_replicate.size() > 1:
        experts.set_force_sum_reduction_for_comms(True)


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, cfg: Config,
                        device: torch.device) -> tuple[nn.Module, list[GradSync]]:
    """(the data-parallel module, the gradient reductions the step runs (`GradReducer`) where no
    DDP/FSDP wrapper does them: DTensor parameters and expert weights, which DDP cannot
    handle)."""
    if cfg.parallel.zero_stage >= 2:
        return apply_fsdp(model, mesh, cfg, device), []
    dp = dp_mesh(mesh)
    if dp.size() == 1:
        return model, []
    if expert_params(model) or \
            any(isinstance(p, DTensor) for p in model.parameters()):
        return model, grad_sync_plan(model, dp)
    return DDP(model, process_group=dp.get_group(), **NO_FORWARD_BUFFER_SYNC,
               device_ids=[device.index] if device.type == "cuda" else None), []


# DDP need not broadcast buffers before every forward: the position tables are computed alike on
# every rank, and MoE's expert bias and load counts are kept in step by the step's own code.
# torch 2.13 renamed the switch and warns on the old name; the new one still broadcasts them once
# at wrapping (the old one did not), harmless as they are equal then.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DDP).parameters
                          else {"broadcast_buffers": False})


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights sharded by expert parallelism (parallel/expert.py), as the model holds
    them now (FSDP replaces parameters with its own)."""
    return [p for m in moe_layers(model).values()
            if isinstance(m.experts, ExpertParallelExperts)
            for p in m.experts.parameters()]


def grad_sync_plan(model: nn.Module, dp: DeviceMesh) -> list[GradSync]:
    """Where no DDP wrapper reduces the gradients (DTensor parameters, expert parallelism,
    pipeline stages): the reductions the step runs (`GradReducer`). Gradients are averaged
    over dp; expert weights (parallel/expert.py) are summed over the ranks holding the same
    experts and divided by the same dp size."""
    params = list(model.parameters())
    expert = expert_params(model)
    if expert:
        rest, ep_rep = _split_experts(model, params, expert)
        return [(rest, dp.get_group(), dp.size()), (expert, ep_rep, dp.size())]
    return [(params, dp.get_group(), dp.size())]


def _split_experts(model: nn.Module, params: list, expert: list) -> tuple[list, object]:
    """(the parameters that are not expert weights, the group of ranks holding the same
    experts: what expert gradients are reduced and their optimizer states partitioned over)."""
    ids = {id(p) for p in expert}
    mesh = next(m.experts.replicate_mesh for m in moe_layers(model).values())
    return [p for p in params if id(p) not in ids], mesh.get_group()


def _copy_from_flat(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Inverse of torch.cat([t.flatten() for t in tensors]): copy `flat` back into `tensors`."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# DDP's default bucket cap (DistributedDataParallel's bucket_cap_mb=25): large enough that each
# all-reduce moves a bandwidth-bound message, small enough that the first buckets go out while
# most of the backward is still to run. A module constant, not a config key: no measurement here
# has asked for another value (GradReducer takes one, for the tests' tiny models).
BUCKET_BYTES = 25 * 2 ** 20


class _Bucket:
    """Parameters whose gradients are all-reduced together: one group, divisor and dtype."""

    def __init__(self, params: list[nn.Parameter], group, divisor: int):
        self.params, self.group, self.divisor = params, group, divisor
        self.ready: set[int] = set()  # ids of the parameters whose gradient is final
        self.grads: list[torch.Tensor] = []
        self.flat: torch.Tensor | None = None
        self.work = None


class GradReducer:
    """The reductions of a `GradSync` plan (parallel/parallelized.py), as DDP runs them: each
    gradient summed over its group and divided by its divisor, in flat buckets of local shards
    (DTensor gradients) of at most `bucket_bytes`, one asynchronous all-reduce per bucket.

    Overlap (`overlap=True`): `arm()` before the last micro-batch's backward; a post-accumulate
    hook on every parameter marks its gradient final, and a bucket's all-reduce is launched as
    soon as all its gradients are final *and* every earlier bucket has been launched. Buckets are
    assigned deterministically, in reverse parameter order (about the order the backward finishes
    them), so every rank launches the same collectives in the same order whatever the timing.
    `finish()` (before clipping) launches what is left, waits, and writes the averages back.
    Without overlap (pipeline stages) `finish()` does all of it after the backward.

    A gradient still missing at `finish()` (a parameter this rank's batch did not reach) is
    taken as zero so that every rank reduces the same buckets; its bucket and every later one
    then wait for `finish()`."""

    def __init__(self, plan, order, bucket_bytes: int = BUCKET_BYTES, overlap: bool = True):
        domain = {}  # id(param) -> (index of its plan entry, param)
        for i, (params, _, _) in enumerate(plan):
            for p in params:
                if p.requires_grad:
                    domain.setdefault(id(p), (i, p))
        pos = {id(p): k for k, p in enumerate(order)}
        ordered = sorted(domain.values(), key=lambda ip: pos.get(id(ip[1]), len(pos)))
        self.buckets: list[_Bucket] = []
        open_buckets: dict[tuple, list] = {}  # (plan entry, dtype) -> [params, bytes]
        for i, p in reversed(ordered):
            shard = local_tensor(p)
            key = (i, shard.dtype)
            entry = open_buckets.setdefault(key, [[], 0])
            entry[0].append(p)
            entry[1] += shard.numel() * shard.element_size()
            if entry[1] >= bucket_bytes:
                self._close(plan, key, open_buckets.pop(key)[0])
        for key, (params, _) in open_buckets.items():
            self._close(plan, key, params)
        self.bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.armed = False
        self.next = 0  # the first bucket not launched yet
        if overlap:
            for b in self.buckets:
                for p in b.params:
                    p.register_post_accumulate_grad_hook(self._grad_ready)

    def _close(self, plan, key: tuple, params: list) -> None:
        _, group, divisor = plan[key[0]]
        self.buckets.append(_Bucket(params, group, divisor or dist.get_world_size(group)))

    def arm(self) -> None:
        """The next backward is the last of the step: reduce as the gradients become final."""
        for b in self.buckets:
            b.ready.clear()
        self.next, self.armed = 0, True

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        self.bucket_of[id(p)].ready.add(id(p))
        self._launch(until_ready=True)

    def _launch(self, until_ready: bool) -> None:
        """Launch the buckets in order, from the first not launched: up to the first one whose
        gradients are not all final (`until_ready`), or all of them."""
        while self.next < len(self.buckets):
            b = self.buckets[self.next]
            if until_ready and len(b.ready) < len(b.params):
                return
            with torch.no_grad():
                for p in b.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                b.grads = [local_tensor(p.grad) for p in b.params]
                b.flat = torch.cat([g.flatten() for g in b.grads])
            b.work = dist.all_reduce(b.flat, group=b.group, async_op=True)
            self.next += 1

    @torch.no_grad()
    def finish(self) -> None:
        """After the backward: launch the buckets not launched yet, wait for every all-reduce
        (on the GPU, an ordering of streams, not a host sync) and write the averages back."""
        self.armed = False
        self._launch(until_ready=False)
        for b in self.buckets:
            b.work.wait()
            b.flat /= b.divisor
            _copy_from_flat(b.flat, b.grads)
            b.flat, b.grads, b.work = None, [], None
        self.next = 0


class ShardedMuonAdamW(MuonAdamW):
    """MuonAdamW (train/optim.py) whose matrices may be DTensors: Newton-Schulz must see the
    whole matrix (NS of a row block is not a row block of NS), so each sharded update is
    gathered, orthogonalised whole and this rank's shard kept.

    What is gathered: every placement that splits a matrix: FSDP's Shard(0) over dp_shard
    (ZeRO 2/3), tensor parallelism's Shard(0)/Shard(1) (column/row-parallel). An expert stack
    [E, in, out] split along E (expert parallelism, and FSDP over ep_replicate, which shard
    dim 0 too) holds whole expert matrices: those placements stay, and each rank orthogonalises
    its own experts without communication. The update is cast to optim.muon_ns_dtype before the
    gather (the first thing Newton-Schulz does), so from the same gradient the result is bit for
    bit the single-process one, and the all-gather moves b = 2 bytes per element (bf16; 4 in
    fp32): per step every rank receives b x (1 - 1/n) x (elements of each n-way split matrix)
    bytes, and computes Newton-Schulz on the whole matrix (n times the work of one process's
    share; docs/performance.md, "Muon").
    Parameters that are not DTensors (one process, DDP, ZeroRedundancyOptimizer's whole
    partitions) take MuonAdamW's path."""

    def orthogonalize(self, update: torch.Tensor, p: torch.Tensor, ns_steps: int) -> torch.Tensor:
        if not isinstance(p, DTensor):
            return newton_schulz(update, ns_steps, self.ns_dtype)
        mesh, placements = p.device_mesh, p.placements
        # an expert stack keeps dim-0 placements (whole experts); everything else is gathered
        whole = [pl if p.ndim == 3 and isinstance(pl, Shard) and pl.dim == 0 else Replicate()
                 for pl in placements]
        if list(placements) == whole:
            return newton_schulz(update, ns_steps, self.ns_dtype)
        full = DTensor.from_local(update.to(NS_DTYPES[self.ns_dtype]), mesh, placements,
                                  run_check=False, shape=p.shape, stride=p.stride())
        ortho = newton_schulz(full.redistribute(mesh, whole).to_local(), ns_steps,
                              self.ns_dtype)
        # back to this rank's shard: Replicate -> Shard is a local slice, no communication
        return DTensor.from_local(ortho, mesh, whole, run_check=False, shape=p.shape,
                                  stride=p.stride()).redistribute(mesh, placements).to_local()


class Partitioned:
    """ZeRO stage 1 where ZeroRedundancyOptimizer cannot go: DTensor parameters (tensor or
    expert parallelism), whose local shards it cannot broadcast; mixed into an optimizer class
    (`PartitionedAdamW`, `PartitionedMuonAdamW`). Parameters come in domains
    `(params, group)`: each parameter is owned by one rank of its domain's group (largest first
    to the least-loaded rank, as ZeroRedundancyOptimizer assigns them). The optimizer holds and
    steps only the owned ones, then each owner broadcasts its updated local shards to its group
    (one flat buffer per owner and dtype). Expert weights form their own domain over the ranks
    that replicate the same experts. The state dict is an ordinary one over the owned
    parameters, so each rank saves its partition by parameter name and a checkpoint loads at
    any layout. (A tensor-parallel matrix is owned by the same dp rank at every tp index, since
    the shards are the same size, so the tp ranks that gather it for Muon all step it.)"""

    def __init__(self, groups: list[dict], domains: list[tuple[list, object]], **kw):
        self.all_groups = groups
        self.all_params = [p for g in groups for p in g["params"]]
        in_domain = {id(p): i for i, (params, _) in enumerate(domains) for p in params}
        self.domains = [([p for p in self.all_params if in_domain.get(id(p)) == i], group)
                        for i, (_, group) in enumerate(domains)]
        if len(in_domain) != len({id(p) for p in self.all_params}):
            raise ValueError("every optimized parameter needs exactly one partition domain")
        self.owner: dict = {}  # parameter -> rank of its domain's group
        for params, group in self.domains:
            world = dist.get_world_size(group)
            load = [0] * world
            for p in sorted(params, key=lambda p: -local_tensor(p).numel()):  # stable: same order
                r = min(range(world), key=load.__getitem__)
                self.owner[p] = r
                load[r] += local_tensor(p).numel()
            if len({self.owner[p] for p in params}) < world:
                raise ValueError(f"{world} data-parallel ranks but only {len(params)} "
                                 f"parameters to partition")
        my_rank = {id(p): dist.get_rank(group) for params, group in self.domains for p in params}
        mine = [{**g, "params": [p for p in g["params"] if self.owner[p] == my_rank[id(p)]]}
                for g in groups]
        super().__init__([g for g in mine if g["params"]], **kw)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for params, group in self.domains:
            rank = dist.get_rank(group)
            for r in range(dist.get_world_size(group)):
                by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
                for p in params:
                    if self.owner[p] == r:
                        by_dtype.setdefault(p.dtype, []).append(local_tensor(p))
                for tensors in by_dtype.values():
                    flat = (torch.cat([t.flatten() for t in tensors]) if r == rank else
                            torch.empty(sum(t.numel() for t in tensors),
                                        dtype=tensors[0].dtype, device=tensors[0].device))
                    dist.broadcast(flat, src=dist.get_global_rank(group, r), group=group)
                    if r != rank:
                        _copy_from_flat(flat, tensors)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.all_params:  # the gradients of parameters other ranks own too
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


class PartitionedAdamW(Partitioned, torch.optim.AdamW):
    """AdamW partitioned over the data-parallel ranks (`Partitioned`)."""


class PartitionedMuonAdamW(Partitioned, ShardedMuonAdamW):
    """Muon + AdamW partitioned over the data-parallel ranks (`Partitioned`)."""


def build_optimizer(model: nn.Module, cfg: Config, mesh: DeviceMesh | None) -> torch.optim.Optimizer:
    """AdamW with the usual groups (no decay on norms, biases, embeddings), each split into
    parameters of one kind (plain tensors, or DTensors of one mesh: expert weights apart), on the
    fused kernel on CUDA and foreach elsewhere (train/optim.py `adamw_kernel`); at ZeRO stage 1
    the states are partitioned over dp_shard by ZeroRedundancyOptimizer (PartitionedAdamW for
    tensor- or expert-parallel parameters). optim.name muon: the same with Muon on the hidden
    matrices (`ShardedMuonAdamW`, `PartitionedMuonAdamW`)."""
    o = cfg.optim
    groups = split_by_kind(optimizer_groups(model, o, cfg))
    params = [p for g in groups for p in g["params"]]
    kernel = adamw_kernel(params_device_type(groups), groups)
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kernel)
    opt_class, partitioned = torch.optim.AdamW, PartitionedAdamW
    if o.name == "muon":
        opt_class, partitioned = ShardedMuonAdamW, PartitionedMuonAdamW
        kw.update(muon_options(o))
    expert = expert_params(model)
    if mesh is None or cfg.parallel.zero_stage != 1 or shard_mesh(mesh).size() == 1:
        return opt_class(groups, **kw)
    shard_group = shard_mesh(mesh).get_group()
    if expert:  # expert weights: partitioned over the ranks holding the same experts
        rest, ep_rep = _split_experts(model, params, expert)
        return partitioned(groups, [(rest, shard_group), (expert, ep_rep)], **kw)
    if any(isinstance(p, DTensor) for p in params):
        return partitioned(groups, [(params, shard_group)], **kw)
    # ZeroRedundancyOptimizer takes one group at construction, its options as the local
    # optimizer's defaults (MuonAdamW needs the group's Muon flag there: a resume initialises the
    # states before any step syncs the groups); add the others after. torch's AdamW takes no
    # lr_scale (muP's): that key is only set on the group.
    first = {k: v for k, v in groups[0].items() if k != "params"}
    ctor = {k: v for k, v in first.items()
            if k != "name" and (k != "lr_scale" or opt_class is not torch.optim.AdamW)}
    zero = ZeroRedundancyOptimizer(groups[0]["params"], optimizer_class=opt_class,
                                   process_group=shard_group, **{**kw, **ctor})
    zero.param_groups[0].update(first)
    # ns_dtype is the local MuonAdamW's own (kept off the groups, whose options checkpoints save)
    # (ZeRO's local optimizer copied group 0 before this, and its step syncs local group keys
    # back to these groups: the local one loses it too)
    for d in (zero.defaults, zero.param_groups[0], zero.optim.param_groups[0]):
        d.pop("ns_dtype", None)
    for g in groups[1:]:
        zero.add_param_group(g)
    return zero


# ----------------------------------------------------------------------------------------------
# Checkpoint state of ZeroRedundancyOptimizer: each rank contributes the AdamW states of the
# parameters it owns, keyed by parameter name as `get_state_dict` keys a plain optimizer, so DCP
# writes every state once and a resume at the same layout reads back exactly its own partition.


def _param_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name.removeprefix("module."))
    return names


def _state_keys(local: torch.optim.Optimizer, group: dict) -> tuple[str, ...]:
    """The state tensors of a stepped parameter of `group` of ZeroRedundancyOptimizer's local
    optimizer: AdamW's, or MuonAdamW's for its groups."""
    if isinstance(local, MuonAdamW):
        return local.state_keys(group)
    return ("step", "exp_avg", "exp_avg_sq")


def zero_state_dict(model: nn.Module, opt: ZeroRedundancyOptimizer,
                    init: bool = False) -> dict:
    """This rank's partition in the flattened layout of torch's `flatten_optimizer_state_dict`
    ("state.<fqn>.<key>" tensors, "param_groups.<fqn>.<key>" hyper-parameters), the layout every
    engine here saves, so a ZeRO-1 checkpoint loads at any other layout and back. Each state
    is saved by the one rank that owns it. init=True creates zero states first (the tensors DCP
    loads into)."""
    names = _param_names(model)
    local = opt.optim
    sd: dict = {}
    for group in local.param_groups:
        for p in group["params"]:
            if init and p not in local.state:
                local.state[p] = {k: torch.zeros((), dtype=torch.float32) if k == "step"
                                  else torch.zeros_like(p) for k in _state_keys(local, group)}
            for k, v in local.state.get(p, {}).items():
                sd[f"state.{names[id(p)]}.{k}"] = v
    for group in opt.param_groups:
        for p in group["params"]:
            for k, v in group.items():
                if k != "params":
                    sd[f"param_groups.{names[id(p)]}.{k}"] = v
    return sd


def load_zero_state_dict(model: nn.Module, opt: ZeroRedundancyOptimizer, sd: dict) -> None:
    """Install the loaded states of this rank's partition (`sd` as `zero_state_dict(init=True)`
    handed it to DCP) and the hyper-parameters of the groups (lr is set every step anyway)."""
    names = _param_names(model)
    for group in opt.optim.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            opt.optim.state[p] = {k: sd[f"state.{n}.{k}"] for k in _state_keys(opt.optim, group)}
    for group in opt.param_groups:
        first = names[id(group["params"][0])]
        for k in group:
            if k != "params" and f"param_groups.{first}.{k}" in sd:
                group[k] = sd[f"param_groups.{first}.{k}"]
    # the local optimizer's groups are synced from these by ZeroRedundancyOptimizer.step()
