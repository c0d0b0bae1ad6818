"""Materialise and initialise a model that was sharded on the meta device.

`parallelize()` receives the model on the meta device (no memory) and applies pipeline split,
tensor, expert and FSDP sharding there, so each parameter is already the shape this rank keeps:
a stage's own layers, a DTensor whose local tensor is this rank's shard. `materialize_shards`
then allocates only those local tensors and fills each with the values that box of the tensor has
in the single-process model (model/init.py), so no rank ever holds a full copy of a weight it
keeps a shard of, and every layout starts from the same weights.

DDP (ZeRO 0/1 without tensor parallelism) and ZeroRedundancyOptimizer need materialised
parameters when they are built: there the model is materialised (whole, as those stages keep it)
before wrapping.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from llmtrain.model.build import materialize
from llmtrain.model.init import layout_free_init, whole_tensor


def dtensor_box(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's local tensor, the full shape, the local box's offset in it) of a parameter
    (the whole tensor where it is not a DTensor)."""
    if not isinstance(param, DTensor):
        return whole_tensor(param)
    local = param.to_local()
    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                          param.placements)
    if tuple(shape) != tuple(local.shape):  # a placement whose shard is not one box
        raise RuntimeError(f"a parameter sharded as {param.placements} is not one box of the "
                           f"full tensor (local {tuple(local.shape)}, computed {tuple(shape)})")
    return local, tuple(param.shape), tuple(offset)


def materialize_shards(model: nn.Module, device: torch.device, seed: int,
                       params_on_cpu: bool = False) -> float:
    """Allocate this rank's shards of a meta `model` on `device` and initialise them as the
    single-process model from `seed` is initialised. The parameter names are `model`'s own FQNs
    (a pipeline rank's model keeps the whole model's names). `params_on_cpu` (FSDP's CPU
    offload): the parameters on the CPU, the buffers on `device`. Returns the seconds it took."""
    materialize(model, "cpu" if params_on_cpu else device)
    if params_on_cpu:
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, buf.to(device))
    return layout_free_init(model, seed, local_box=dtensor_box)
