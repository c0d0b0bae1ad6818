"""The memory-lean training loss (`train.loss: chunked`): the output layer and the token cross
entropy fused and run over chunks of tokens, so that the logits of the whole micro-batch never
exist at once.

The plain loss (loss.py) holds [N, V] logits in fp32 and, for the backward, their softmax and
gradient: at N = 4096 tokens and a 128k vocabulary that is 2 GiB each, more than the whole model
of a 1B run. Here the forward computes each chunk's logits (in the compute dtype: bf16 under
autocast), their log-sum-exp in fp32, and keeps only the log-sum-exp of each token; the backward
computes each chunk's logits again and turns them into that chunk's share of the gradients of the
hidden states and the output weight (the recomputation costs one more [N, D] x [D, V] matmul,
the price Liger-Kernel's fused linear cross entropy and Megatron's chunked loss pay too).

Under tensor parallelism the output weight is split over the vocabulary (parallel/tensor.py):
each rank computes its vocabulary slice of every chunk's logits, and the ranks combine their
partial log-sum-exps and target logits once per forward (one all-gather of [2, N]); in the
backward each rank's gradient of the hidden states is a partial sum over its vocabulary slice,
summed over the tp ranks as the column-parallel output layer's backward would (Megatron's
vocab-parallel cross entropy, applied chunk by chunk).

`train.loss: fused` is the same loss without the recomputation: with autograd on, the forward
turns each chunk's logits into that chunk's gradients at once (the softmax less the one-hot
label, times the mask) and keeps the gradients of the hidden states and the output weight for
the backward, which only scales them by the incoming gradient (a scalar: the loss is a sum).
The output layer then costs the plain loss's three matmuls, not four, and each chunk's logits
are turned into gradients right after the matmul wrote them (still in the cache where a chunk
fits: 16 MiB at 1024 tokens x vocab 4096). The price: one fp32 buffer the size of the output
weight (or its vocabulary slice) from the forward to the backward, instead of nothing; the
gradient of the hidden states replaces them in what is kept. The backward scales both in place,
so a graph kept with retain_graph cannot be run backward twice. Liger-Kernel's fused
linear cross entropy does the same on the GPU. Under tensor parallelism the ranks combine their
log-sum-exps once per chunk (the softmax of a chunk needs the whole vocabulary's), not once per
forward. Without autograd (evaluation) both losses run the same forward.

`model.logit_softcap` c > 0 caps each chunk's logits z as the model's plain output does,
c tanh(z / c) (Gemma 2), before the log-sum-exp; the backward multiplies the gradient of the
capped logits by d/dz = 1 - tanh(z / c)^2.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of mask * CE(h W^T, labels), for hidden states h [N, D] and the output
    weight (or this rank's vocabulary slice of it, rows from `offset`) W [V, D]; saves h, W,
    labels, mask and the per-token log-sum-exp, never [N, V]. softcap > 0 caps the logits."""

    @staticmethod
    def forward(ctx, h, weight, labels, mask, chunk: int, dtype: torch.dtype, group,
                softcap: float = 0.0):
        offset = vocab_offset(weight, group)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            partial = torch.empty(2, h.shape[0], device=h.device)  # (log-sum-exp, target)
            for s in range(0, h.shape[0], chunk):
                logits = capped(h[s:s + chunk].to(dtype) @ w.t(), softcap)[0]
                partial[0, s:s + chunk] = torch.logsumexp(logits, dim=-1)
                idx, owned = local_labels(labels[s:s + chunk], offset, w.shape[0])
                partial[1, s:s + chunk] = logits.gather(1, idx[:, None])[:, 0] * owned
            lse, target = combine_vocab_shards(partial, group)
        ctx.save_for_backward(h, weight, labels, mask, lse)
        ctx.chunk, ctx.dtype, ctx.group, ctx.offset = chunk, dtype, group, offset
        ctx.softcap = softcap
        return ((lse - target) * mask).sum()

    @staticmethod
    def backward(ctx, grad):
        h, weight, labels, mask, lse = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            scale = grad * mask  # dCE_i/dlogits = softmax_i - onehot(label_i), times this
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            for s in range(0, h.shape[0], chunk):
                h_c = h[s:s + chunk].to(dtype)
                logits, slope = capped(h_c @ w.t(), ctx.softcap)
                p = logits.sub_(lse[s:s + chunk, None]).exp_()
                idx, owned = local_labels(labels[s:s + chunk], ctx.offset, w.shape[0])
                p.scatter_add_(1, idx[:, None], -owned[:, None])
                p.mul_(scale[s:s + chunk, None])
                backprop_chunk(p, slope, w, h_c, grad_h[s:s + chunk], grad_w)
            sum_over_vocab_shards(grad_h, ctx.group)
        return grad_h, grad_w.to(weight.dtype), None, None, None, None, None, None


class FusedLinearCrossEntropy(torch.autograd.Function):
    """LinearCrossEntropy's value with the gradients computed in the forward (module docstring:
    `train.loss: fused`); saves the gradients of h and W, [N, D] and an fp32 [V, D] (none where
    W does not require grad). Its backward scales them in place and hands them on, so that no
    second weight-sized buffer exists at the backward's start, when every activation is still
    held: hence one backward per forward."""

    @staticmethod
    def forward(ctx, h, weight, labels, mask, chunk: int, dtype: torch.dtype, group,
                softcap: float = 0.0):
        offset = vocab_offset(weight, group)
        need_w = ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            ce = torch.empty(h.shape[0], device=h.device)
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                h_c, mask_c = h[s:s + chunk].to(dtype), mask[s:s + chunk]
                logits, slope = capped(h_c @ w.t(), softcap)
                idx, owned = local_labels(labels[s:s + chunk], offset, w.shape[0])
                target = logits.gather(1, idx[:, None])[:, 0] * owned
                # one exp per logit: p = exp(z - max) gives this slice's log-sum-exp from its
                # row sums, and the softmax over the whole vocabulary is p exp(max - lse)
                top = logits.amax(dim=-1)
                p = logits.sub_(top[:, None]).exp_()
                partial = torch.stack([top + p.sum(dim=-1).log(), target])
                lse, target = combine_vocab_shards(partial, group)
                ce[s:s + chunk] = (lse - target) * mask_c
                p.mul_((torch.exp(top - lse) * mask_c)[:, None])  # softmax x mask
                p.scatter_add_(1, idx[:, None], -(owned * mask_c)[:, None])  # less the label
                backprop_chunk(p, slope, w, h_c, grad_h[s:s + chunk], grad_w)
            sum_over_vocab_shards(grad_h, group)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype, ctx.done = weight.dtype, False
        return ce.sum()

    @staticmethod
    def backward(ctx, grad):
        if ctx.done:
            raise RuntimeError("train.loss=fused runs one backward per forward (its backward "
                               "scales the gradients its forward computed in place); for a "
                               "second backward through a kept graph use train.loss=chunked")
        ctx.done = True
        grad_h, grad_w = ctx.saved_tensors
        grad_w = None if grad_w is None else grad_w.mul_(grad).to(ctx.weight_dtype)
        return grad_h.mul_(grad), grad_w, None, None, None, None, None, None


def backprop_chunk(p: torch.Tensor, slope: torch.Tensor | None, w: torch.Tensor,
                   h_c: torch.Tensor, grad_h_c: torch.Tensor, grad_w: torch.Tensor | None) -> None:
    """A chunk's share of the gradients from p, the gradient of its (capped) fp32 logits
    (overwritten): through the cap's slope to the logits, then grad_h_c = dlogits W and
    grad_w += dlogits^T h_c (None: W needs none), the matmuls in W's compute dtype."""
    d_logits = (p if slope is None else p.mul_(slope)).to(w.dtype)
    grad_h_c.copy_(d_logits @ w)
    if grad_w is not None:
        accumulate_matmul(grad_w, d_logits.t(), h_c)


def capped(logits: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 logits z, or c tanh(z / c) for softcap c > 0; None, or the cap's derivative
    1 - tanh(z / c)^2 for the backward)."""
    z = logits.float()
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, 1 - t * t


def local_labels(labels: torch.Tensor, offset: int,
                 vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(label - offset clamped into [0, vocab), 1.0 where this vocabulary slice holds the label
    else 0.0): every token of a single process; under tp each label is on one rank only."""
    local = labels - offset
    owned = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), owned.float()


def accumulate_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b with out fp32: in place where a and b are fp32 too (a temporary a @ b is the
    size of the weight); bf16 products are added into fp32 chunk by chunk (cast on the fly)."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b


def vocab_offset(weight: torch.Tensor, group) -> int:
    """The first vocabulary row of this rank's slice of the output weight (0 without tp; the
    config requires tp to divide the vocabulary, so every slice has weight.shape[0] rows)."""
    return 0 if group is None else dist.get_rank(group) * weight.shape[0]


def combine_vocab_shards(partial: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp, target logit) [N] of every token over the whole vocabulary from each tp
    rank's (log-sum-exp, target logit) over its slice, `partial` [2, N]: one all-gather."""
    if group is None:
        return partial[0], partial[1]
    parts = [torch.empty_like(partial) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, partial.contiguous(), group=group)
    every = torch.stack(parts)  # [tp, 2, N]
    return torch.logsumexp(every[:, 0], dim=0), every[:, 1].sum(0)


def sum_over_vocab_shards(grad_h: torch.Tensor, group) -> None:
    """Each tp rank's gradient of the hidden states covers its vocabulary slice: sum them (the
    backward of the column-parallel output layer's replicated input)."""
    if group is not None:
        dist.all_reduce(grad_h, group=group)


def linear_cross_entropy_sum(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             mask: torch.Tensor, chunk_tokens: int, group=None,
                             softcap: float = 0.0, fused: bool = False) -> torch.Tensor:
    """Sum of token cross entropies (fp32) of the logits h @ weight^T over positions where mask
    is 1, as loss.py's cross_entropy_sum computes them, `chunk_tokens` tokens at a time; h
    [N, D], weight [V, D] (or this rank's rows of it, `group` the tp ranks holding the others),
    labels and mask [N]. The logits are computed in autocast's dtype where it is on; softcap
    c > 0 takes the cross entropy of c tanh(logits / c). `fused`: the gradients are computed in
    the forward (train.loss=fused) where autograd is on and h or W requires grad."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    fused = fused and torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    loss = FusedLinearCrossEntropy if fused else LinearCrossEntropy
    return loss.apply(h, weight, labels, mask.float(), chunk_tokens, dtype, group, softcap)


def chunked_loss_head(labels: torch.Tensor, mask: torch.Tensor, chunk_tokens: int,
                      sequence_parallel: bool = False, fused: bool = False
                      ) -> Callable[[torch.Tensor, nn.Module], torch.Tensor]:
    """The `head` Transformer.forward hands its final hidden states [B, T, D] and output layer:
    the chunked CE sum over the batch's labels and mask [B, T] (of the logits capped at
    `softcap`, model.logit_softcap, which forward passes). A vocabulary-sharded output
    weight (a DTensor under tp) gives the tp version; under sequence parallelism the hidden
    states arrive split along T and are gathered first, as the output layer's plan would.
    `fused`: train.loss=fused, the gradients computed in the forward."""

    def head(h: torch.Tensor, output: nn.Module, softcap: float = 0.0) -> torch.Tensor:
        weight, group = output.weight, None
        if isinstance(weight, DTensor) and weight.placements[-1] == Shard(0):
            mesh = weight.device_mesh
            if sequence_parallel:
                h = DTensor.from_local(h, mesh, [Shard(1)], run_check=False).full_tensor()
            weight, group = weight.to_local(), mesh.get_group()
        return linear_cross_entropy_sum(h.flatten(0, 1), weight, labels.flatten(),
                                        mask.flatten(), chunk_tokens, group, softcap, fused)
    return head
