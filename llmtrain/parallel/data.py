"""Data parallelism. ZeRO 0: every rank holds everything; gradients are averaged by DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from llmtrain.config import Config


def apply_data_parallel(model: nn.Module, mesh: DeviceMesh, cfg: Config,
                        device: torch.device) -> nn.Module:
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    if dp_mesh.size() == 1:
        return model
    return DDP(model, process_group=dp_mesh.get_group(),
               device_ids=[device.index] if device.type == "cuda" else None)
