"""The training loss and its reduction over ranks, shared by the torch engine's step
(train/loop.py), the pipeline schedules (parallel/pipeline.py) and the DeepSpeed engine
(engines/deepspeed.py).

Its own module because all three use it and the loop imports the other two: it imports nothing
of theirs. The normalisation it serves is described in train/loop.py.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate

from llmtrain.config import Config


def autocast(cfg: Config, device: torch.device):
    """The forward's autocast context: bf16 under `train.precision: bf16`, else none."""
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """Sum of token cross entropies (fp32) over positions where mask is 1. Vocab-sharded logits
    (a DTensor under tensor parallelism) are reduced by the loss-parallel cross entropy: call
    this, and the backward, inside `loss_parallel()`."""
    if isinstance(logits, DTensor):
        labels = DTensor.from_local(labels.flatten(), logits.device_mesh, [Replicate()],
                                    run_check=False)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none")
        return (ce.to_local() * mask.flatten()).sum()
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return (ce * mask.flatten()).sum()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the data-parallel ranks (`group`); the ranks of a tp group hold the same batch."""
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return t


def reduce_step_losses(ce_sum: torch.Tensor, aux: torch.Tensor, n_global: torch.Tensor, group,
                       dp_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE per token over the global batch, router losses averaged over the dp ranks, as they
    enter the gradient) from this rank's sums: one all-reduce."""
    sums = all_reduce_sum(torch.stack([ce_sum, aux]), group)
    return sums[0] / n_global, sums[1] / dp_size
