"""Everything that knows about ranks. `parallelize()` applies the techniques in a fixed order."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from llmtrain.config import Config
from llmtrain.parallel.data import apply_data_parallel


def parallelize(model: nn.Module, mesh: DeviceMesh | None, cfg: Config,
                device: torch.device) -> nn.Module:
    """Apply data parallelism (ZeRO 0 = DDP) to a materialised, initialised model.

    Order (DESIGN.md): pipeline split, tensor parallel, expert parallel, activation checkpointing
    and compile, data parallel. Only the last is implemented in this build; the config validator
    refuses the others.
    """
    if mesh is None:
        return model
    return apply_data_parallel(model, mesh, cfg, device)
