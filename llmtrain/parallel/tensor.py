"""Tensor and sequence parallelism as DTensor plans (Megatron-LM layouts, torchtitan style).

Per block: q/k/v and the MLP's w1/w3 are column-parallel (each rank holds a slice of the heads /
hidden units), wo and w2 row-parallel (partial sums reduced across tp). Attention derives its
local head count from the weight shapes, so the plain model runs on the shards unchanged.

Sequence parallel (Korthikanti et al. 2022): between the blocks' matmuls the residual stream is
split along the sequence (Shard(1)); norms and dropout run on 1/tp of the tokens; the all-reduce
of a row-parallel output becomes a reduce-scatter and the column-parallel input an all-gather.

The vocabulary is split too: the embedding is row-parallel over vocab rows (input replicated),
the output projection column-parallel over vocab, and the cross entropy is computed on the
vocab-sharded logits under `loss_parallel()` without gathering [B, T, V].

Mixture-of-Experts layers: the router stays whole on every tp rank (each routes the same
tokens the same way); every expert is split like the dense FFN, w1/w3 by hidden columns and w2
by hidden rows, so each tp rank runs all routed tokens through its share of every expert's hidden
units (Megatron's expert tensor parallelism); the partial expert outputs are summed over tp
before the gates weight them, so that the gates' gradient sees whole outputs. Shared experts are
a dense FFN. Under sequence parallelism the layer takes the gathered sequence and returns its
sequence shard. With expert parallelism (parallel/expert.py) each rank's experts are split
over tp the same way. The model's Router and GroupedExperts become TensorParallelRouter and
TensorParallelExperts (the same objects and parameter names, as FSDP's fully_shard does), whose
forward hands the plain model code this rank's local tensors.

Key/value heads: with tp dividing n_kv_heads, wk/wv are column-parallel like wq. Multi-query
attention (n_kv_heads=1) keeps wk/wv whole on every tp rank (each rank's query heads read the
single kv head); the gradient of k/v is then summed over tp before it reaches wk/wv, since each
rank's query heads contribute only part of it. Other n_kv_heads < tp are refused by the config.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (DTensor, Replicate, Shard, distribute_module,
                                      distribute_tensor)
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput,
                                               PrepareModuleInputOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from llmtrain.config import Config
from llmtrain.model.moe import GroupedExperts, MoE, Router


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over a process group
    (Megatron's f: the input of a computation split over the group)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if grad.numel():  # empty on every rank of the group alike (same tokens on each)
            dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """Forward all-reduces (sums) partial results over a process group; the backward is the
    identity (Megatron's g: every rank's part gets the whole sum's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone(memory_format=torch.contiguous_format)
        if x.numel():
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (differentiable), a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_weights(experts: GroupedExperts) -> tuple[torch.Tensor | None, ...]:
    """(w1, w2, w3) of `experts` as this rank's shards (w3 None without a GLU)."""
    return tuple(None if w is None else local_tensor(w)
                 for w in (experts.w1, experts.w2, experts.w3))


class TensorParallelRouter(Router):
    """A Router whose gate weight is a Replicate DTensor over tp (so that the optimizer and
    gradient clipping see one kind of tensor): every tp rank routes the same tokens the same way
    with its local copy."""

    def forward(self, x: torch.Tensor):
        return self.route(x, local_tensor(self.gate.weight))


class TensorParallelExperts(GroupedExperts):
    """GroupedExperts split over tp like the dense FFN: w1, w3 [E, d, f] by hidden columns
    (Shard(2)), w2 [E, f, d] by hidden rows (Shard(1)). Every tp rank runs the same tokens through
    its hidden units of every expert; the partial outputs are summed over `tp_group`."""

    tp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return self.run(x, counts, local_weights(self))

    def run(self, x: torch.Tensor, counts: torch.Tensor, weights) -> torch.Tensor:
        x = _SumGradOverGroup.apply(x, self.tp_group)
        return _SumOverGroup.apply(super().run(x, counts, weights), self.tp_group)


def apply_tp_moe(moe: MoE, tp_mesh: DeviceMesh) -> None:
    """Split an MoE layer's router and experts over `tp_mesh` in place (see the module
    docstring): the router becomes a TensorParallelRouter with its weight replicated, the experts
    a TensorParallelExperts split over hidden units. The shared experts are left to the block's
    plan (`_block_plan`)."""
    router = moe.router
    router.gate.weight = nn.Parameter(DTensor.from_local(router.gate.weight.detach(), tp_mesh,
                                                         [Replicate()], run_check=False))
    router.__class__ = TensorParallelRouter
    experts = moe.experts
    for name, dim in (("w1", 2), ("w3", 2), ("w2", 1)):  # [E, d, f], [E, d, f], [E, f, d]
        w = getattr(experts, name)
        if w is not None:
            setattr(experts, name, nn.Parameter(distribute_tensor(w.detach(), tp_mesh,
                                                                  [Shard(dim)])))
    experts.__class__ = TensorParallelExperts
    experts.tp_group = tp_mesh.get_group()


def _replicate(module: nn.Module, mesh: DeviceMesh, sum_output_grad: bool = False) -> None:
    """Keep `module` whole on every tp rank, its parameters as Replicate DTensors (so that the
    optimizer and gradient clipping see one kind of tensor); plain tensors in, plain out."""
    group = mesh.get_group()

    def input_fn(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x
                     for x in inputs)

    def output_fn(mod, out, mesh):
        out = out.to_local() if isinstance(out, DTensor) else out
        return _SumGradOverGroup.apply(out, group) if sum_output_grad else out

    distribute_module(module, mesh, input_fn=input_fn, output_fn=output_fn)


def _block_plan(block: nn.Module, shard_kv: bool, seq) -> dict[str, object]:
    """Column-parallel q/k/v (if shard_kv) and w1/w3, row-parallel wo and w2 (output `seq`),
    for the self-attention and, in an encoder-decoder's decoder block, the cross-attention."""
    plan: dict[str, object] = {}
    for name in ("attention", "cross_attention"):
        if getattr(block, name, None) is None:
            continue
        plan[f"{name}.wq"] = ColwiseParallel()
        plan[f"{name}.wo"] = RowwiseParallel(output_layouts=seq)
        if shard_kv:
            plan[f"{name}.wk"] = ColwiseParallel()
            plan[f"{name}.wv"] = ColwiseParallel()
    ffn, prefix = block.feed_forward, "feed_forward"
    if isinstance(ffn, MoE):  # the shared experts are a dense FFN inside the layer
        ffn, prefix, seq = ffn.shared_experts, "feed_forward.shared_experts", Replicate()
    if ffn is not None:
        plan[f"{prefix}.w1"] = ColwiseParallel()
        plan[f"{prefix}.w2"] = RowwiseParallel(output_layouts=seq)
        if ffn.w3 is not None:
            plan[f"{prefix}.w3"] = ColwiseParallel()
    return plan


def _replicate_over_heads(norm: nn.Module, mesh: DeviceMesh) -> None:
    """A per-head norm (QK-norm) whose input [B, T, heads, head_dim] holds this rank's heads:
    its scale a Replicate DTensor and its input a Shard(2) one, so that the scale's gradient, a
    sum over every head, is summed over the tp ranks (as a SequenceParallel norm's over tokens);
    plain tensors out."""
    distribute_module(
        norm, mesh,
        input_fn=lambda mod, inputs, mesh: tuple(DTensor.from_local(x, mesh, [Shard(2)],
                                                                    run_check=False)
                                                 for x in inputs),
        output_fn=lambda mod, out, mesh: out.to_local())


def _replicate_block_rest(block: nn.Module, tp_mesh: DeviceMesh, shard_kv: bool) -> None:
    """What the plan leaves whole: norms, and under MQA the single kv head's wk/wv (their
    gradients summed over tp, as each rank's query heads use only part of them); and an MoE
    layer's router and experts."""
    if isinstance(block.feed_forward, MoE):
        apply_tp_moe(block.feed_forward, tp_mesh)
    for name in ("attention", "cross_attention"):
        attn = getattr(block, name, None)
        if attn is not None and not shard_kv:
            _replicate(attn.wk, tp_mesh, sum_output_grad=True)
            _replicate(attn.wv, tp_mesh, sum_output_grad=True)
    for name in ("attention_norm", "cross_attention_norm", "ffn_norm"):
        norm = getattr(block, name, None)
        if norm is not None:
            _replicate(norm, tp_mesh)


def apply_tp_encoder_decoder(model: nn.Module, tp_mesh: DeviceMesh, cfg: Config) -> None:
    """Shard an `EncoderDecoder` over `tp_mesh` in place (no sequence parallelism): every
    encoder and decoder block as a decoder block (the decoder's cross-attention like its
    self-attention: queries, keys and values column-parallel over heads, output row-parallel),
    vocab-parallel embeddings and output, and T5's relative position bias split over heads like
    the attention (its [buckets, heads] table column-parallel), so each rank adds the bias of
    exactly its own heads."""
    top: dict[str, object] = {}
    embed = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = embed
    top["output"] = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    parallelize_module(model, tp_mesh, top)
    if model.tok_embeddings is not None:  # tied: both vocab-row sharded, one DTensor serves both
        model.output.weight = model.tok_embeddings.weight
    n_kv = cfg.model.kv_heads
    shard_kv = n_kv % tp_mesh.size() == 0
    for stack in (model.encoder, model.decoder):
        plan: dict[str, object] = {}
        if stack.tok_embeddings is not None:
            plan["tok_embeddings"] = embed
        if stack.pos_embeddings is not None:
            plan["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                     output_layouts=Replicate())
        if stack.relative_bias is not None:
            plan["relative_bias.relative_attention_bias"] = ColwiseParallel()
        parallelize_module(stack, tp_mesh, plan)
        if stack.norm is not None:
            _replicate(stack.norm, tp_mesh)
        for block in stack.layers.values():
            parallelize_module(block, tp_mesh, _block_plan(block, shard_kv, Replicate()))
            _replicate_block_rest(block, tp_mesh, shard_kv)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, cfg: Config) -> None:
    """Shard `model` (a `Transformer` or an `EncoderDecoder`) over `tp_mesh` in place."""
    if cfg.model.arch == "encoder_decoder":
        apply_tp_encoder_decoder(model, tp_mesh, cfg)
        return
    sp = cfg.parallel.sequence_parallel
    seq = Shard(1) if sp else Replicate()
    tied = model.output is not None and model.tok_embeddings is not None \
        and model.output.weight is model.tok_embeddings.weight

    top: dict[str, object] = {}
    if model.tok_embeddings is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)
    if model.pos_embeddings is not None:  # [T, D] table: its output is split along T under SP
        top["pos_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                output_layouts=Shard(0) if sp else Replicate())
    if model.output is not None:
        # vocab-sharded logits stay a DTensor for loss_parallel()
        top["output"] = ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1),
                                        use_local_output=False)
    if sp and model.norm is not None:
        top["norm"] = SequenceParallel(use_local_output=True)
    parallelize_module(model, tp_mesh, top)
    if not sp and model.norm is not None:
        _replicate(model.norm, tp_mesh)
    if tied:  # both are vocab-row sharded (Shard(0)), so one DTensor serves both
        model.output.weight = model.tok_embeddings.weight

    n_kv = cfg.model.kv_heads
    shard_kv = n_kv % tp_mesh.size() == 0
    for block in model.layers.values():
        plan = _block_plan(block, shard_kv, seq)
        if sp:
            plan["attention_norm"] = SequenceParallel(use_local_output=True)
            plan["ffn_norm"] = SequenceParallel(use_local_output=True)
            # gather the sequence once per sublayer (rope/mask args pass through untouched)
            plan["attention"] = PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None),
                use_local_output=True)
            plan["feed_forward"] = PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                use_local_output=True)
            if isinstance(block.feed_forward, MoE):  # whole output on every rank: keep a shard
                plan["feed_forward"] = PrepareModuleInputOutput(
                    input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                    use_local_input=True, output_layouts=(Replicate(),),
                    desired_output_layouts=(Shard(1),), use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        if not shard_kv:  # MQA: whole wk/wv per rank, gradients summed over tp
            _replicate(block.attention.wk, tp_mesh, sum_output_grad=True)
            _replicate(block.attention.wv, tp_mesh, sum_output_grad=True)
        if not sp:
            _replicate(block.attention_norm, tp_mesh)
            _replicate(block.ffn_norm, tp_mesh)
        if block.attention.q_norm is not None:  # QK-norm (the config requires sharded kv heads)
            _replicate_over_heads(block.attention.q_norm, tp_mesh)
            _replicate_over_heads(block.attention.k_norm, tp_mesh)
        if isinstance(block.feed_forward, MoE):
            apply_tp_moe(block.feed_forward, tp_mesh)
