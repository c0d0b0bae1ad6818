"""Expert parallelism (`parallel.ep`): each MoE layer's E experts split over ep ranks.

The ep ranks are data-parallel ranks (ep divides dp_shard): every rank routes its own tokens as
before, with the same per-rank capacity, so the result is the data-parallel run's. Under context
parallelism the ep groups are formed at each cp index (the ranks with the same part of the
sequences), and a rank's tokens are its T/cp of each sequence (docs/long_context.md). Then, per MoE
layer (GShard, Lepikhin et al. 2020; the layout of DeepSpeed-MoE and torchtitan):

  1. the routed assignments, already sorted by global expert, are sent to the rank owning each
     expert: expert e lives on ep rank e // (E / ep). The per-(rank, local expert) counts go first
     (`all_to_all_single` of E integers), then the token vectors (`all_to_all_single` with uneven
     splits, differentiable);
  2. the received rows (grouped by source rank, then local expert) are regrouped by local expert
     and run through this rank's E / ep experts (one grouped matmul);
  3. the outputs travel back by the inverse permutation and the reverse all-to-all, in the order
     they were sent, and the MoE layer combines them with the gates as before.
Per step the all-to-alls move 2 x (assignments sent off-rank) x d_model values each way.

Expert weights are DTensors sharded Shard(0) over the ep group (and, with tensor parallelism,
over tp along their hidden units: a 2-D (ep, tp) mesh): checkpoints store them at their global
shape [E, ...] and reshard on load like any other parameter. Gradients: each owner's expert
gradient already sums the contributions of every ep rank's tokens (the backward of the
all-to-all), so expert gradients are summed over the ranks that replicate the same experts
(`ep_replicate`) and divided by the whole data-parallel size; the other parameters are averaged
over all dp ranks (the `grad_sync` plan, which parallel/data.py `GradReducer` runs in buckets
during the last micro-batch's backward, dense and expert buckets in one fixed order on every
rank). At ZeRO 2/3 the experts of each layer are an FSDP unit of their own, sharded
over ep_replicate, with the same divisor (torchtitan's layout). Under pipeline parallelism each
stage shards the experts of its own layers over the ep ranks of that stage.

`apply_ep` turns each layer's GroupedExperts into an ExpertParallelExperts (over tp too: an
ExpertTensorParallelExperts), the same object and parameter names, as FSDP's fully_shard does;
its forward runs the model's plain expert code on this rank's local shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from llmtrain.model.moe import GroupedExperts, moe_layers
from llmtrain.parallel.tensor import TensorParallelExperts, local_weights


def expert_mesh_ranks(ranks: torch.Tensor, ep: int) -> torch.Tensor:
    """The global ranks of the mesh `ranks` (pp, dp_replicate, dp_shard, cp, tp) laid out as
    (pp, ep_replicate, ep, tp): within each pipeline stage, cp index and tp index, each dp_shard
    group split into contiguous chunks of ep ranks (the expert groups); the ranks of a stage and
    tp index holding the same experts form the ep_replicate groups, which span dp_replicate, the
    dp_shard chunks and cp (context-parallel ranks hold different tokens of the same sequences:
    their expert gradients are summed like a data-parallel rank's)."""
    pp, cp, tp = ranks.shape[0], ranks.shape[3], ranks.shape[4]
    # (pp, dp_replicate x dp_shard / ep, ep, cp, tp), then cp moved among the replicas
    return ranks.reshape(pp, -1, ep, cp, tp).transpose(2, 3).reshape(pp, -1, ep, tp)


def build_ep_mesh(mesh: DeviceMesh, ep: int) -> DeviceMesh:
    """The (ep_pp, ep_replicate, ep, tp) mesh of `expert_mesh_ranks`. Collective: every rank
    builds every group; index it by name for this rank's ("ep", "ep_replicate", ...)."""
    return DeviceMesh(mesh.device_type, expert_mesh_ranks(mesh.mesh, ep),
                      mesh_dim_names=("ep_pp", "ep_replicate", "ep", "tp"))


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts whose E experts are split over the ranks of `ep_group` (weights Shard(0)
    DTensors): forward moves the routed rows to the ranks owning their experts and back (module
    docstring).
      ep_group           the ranks the experts are split over (the all-to-alls)
      replicate_mesh     the ranks holding the same experts: what their gradients are reduced
                         over (parallel/data.py)
      a2a_rows_off_rank  rows the last forward sent to other ranks, each of which came back once
                         (benchmarks/moe_alltoall.py)"""

    ep_group: dist.ProcessGroup
    replicate_mesh: DeviceMesh
    a2a_rows_off_rank: int

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, d] sorted by global expert, counts [E] -> the rows through their experts."""
        group = self.ep_group
        ep = dist.get_world_size(group)
        n_local = counts.numel() // ep
        send = counts.view(ep, n_local)  # rows to each rank, per its local expert
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(-1), send.reshape(-1), group=group)
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        self.a2a_rows_off_rank = sum(in_splits) - in_splits[dist.get_rank(group)]
        received = all_to_all_single_autograd(x, out_splits, in_splits, group)
        received = torch.ops._c10d_functional.wait_tensor(received)
        # received: by source rank, then local expert -> regroup by local expert, then source rank
        sizes = recv.reshape(-1).tolist()  # chunk (source s, expert e) at index s * n_local + e
        chunks = torch.arange(len(sizes)).view(ep, n_local).t().reshape(-1).tolist()
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        perm = torch.cat([torch.arange(starts[c], starts[c] + sizes[c]) for c in chunks]
                         + [torch.zeros(0, dtype=torch.long)]).to(x.device)
        weights = local_weights(self)
        y = self.run(received[perm], recv.sum(0), weights)
        if y.shape[0] == 0:
            # No rank sent this rank a token. The empty result must still hang off the tokens
            # and this rank's expert weights, as everyone else's does: otherwise this rank's
            # backward skips the all-to-alls the other ranks wait in.
            y = received[perm] * 0 + sum(w.sum() for w in weights if w is not None) * 0
        back = torch.empty_like(y).index_copy(0, perm, y)  # inverse permutation
        out = all_to_all_single_autograd(back, in_splits, out_splits, group)
        return torch.ops._c10d_functional.wait_tensor(out)


class ExpertTensorParallelExperts(ExpertParallelExperts, TensorParallelExperts):
    """Experts split over ep (which experts) and tp (which hidden units of each): the all-to-alls
    of ExpertParallelExperts around the tp-reduced run of TensorParallelExperts."""


def apply_ep(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts over ep_mesh["ep"] (built by `build_ep_mesh`; experts
    already split over tp by parallel/tensor.py keep that split on its "tp" dimension) and make
    them an ExpertParallelExperts (ExpertTensorParallelExperts over tp too). Names stay."""
    group = ep_mesh["ep"].get_group()
    for moe in moe_layers(model).values():
        experts = moe.experts
        for name in ("w1", "w2", "w3"):
            w = getattr(experts, name)
            if w is None:
                continue
            if isinstance(w, DTensor):  # split over tp: gather once, shard over (ep, tp)
                mesh, placements = ep_mesh["ep", "tp"], [Shard(0), *w.placements]
                w = w.full_tensor()
            else:
                mesh, placements = ep_mesh["ep"], [Shard(0)]
            sharded = nn.Parameter(distribute_tensor(w.detach(), mesh, placements))
            setattr(experts, name, sharded)
        tp = isinstance(experts, TensorParallelExperts)
        experts.__class__ = ExpertTensorParallelExperts if tp else ExpertParallelExperts
        experts.ep_group = group
        experts.replicate_mesh = ep_mesh["ep_replicate"]
        experts.a2a_rows_off_rank = 0
